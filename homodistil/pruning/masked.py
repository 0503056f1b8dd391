"""Maskable drop-ins for ``nn.Linear`` and ``nn.LayerNorm`` (same parameters, same state-dict keys).

While masks are live the student computes exactly what its shrunk version would compute,
scattered back to full width: masked linear outputs are 0, and a masked LayerNorm takes its
statistics over the live units only. Without a mask both behave like their base class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from homodistil.kernels.masked_linear import masked_linear

from .groups import Group


class MaskedLinear(nn.Linear):
    """``y = x Wᵀ + b`` with output units outside ``out_mask`` forced to 0."""

    out_mask: torch.Tensor | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "MaskedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared, not copied
        new.out_mask = None
        return new

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.out_mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_mask is None:
            return F.linear(x, self.weight, self.bias)
        return masked_linear(x, self.weight, self.bias, out_mask=self.out_mask.to(x.device))


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the live units ``mask`` only; masked units output exactly 0."""

    live: torch.Tensor | None = None

    @classmethod
    def wrap(cls, norm: nn.LayerNorm) -> "MaskedLayerNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps = norm.normalized_shape, norm.eps
        new.elementwise_affine = norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias
        new.live = None
        return new

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.live = None if mask is None else mask.nonzero().squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., d)
        if self.live is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        live = self.live.to(x.device)
        y = F.layer_norm(x.index_select(-1, live), (live.numel(),),
                         self.weight.index_select(0, live), self.bias.index_select(0, live), self.eps)
        return x.new_zeros(x.shape).index_copy(-1, live, y)  # (..., d), zeros where masked


_WRAPPERS = {"out": (nn.Linear, MaskedLinear), "norm": (nn.LayerNorm, MaskedLayerNorm)}


def make_maskable(model: nn.Module, groups: list[Group]) -> None:
    """Swap every module named by a group's mask points for its maskable drop-in."""
    for group in groups:
        for point in group.points:
            base, wrapper = _WRAPPERS[point.how]
            module = model.get_submodule(point.module)
            if isinstance(module, wrapper):
                continue
            assert isinstance(module, base), f"{point.module}: expected {base.__name__}, got {type(module).__name__}"
            parent_name, _, attr = point.module.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, wrapper.wrap(module))


def apply_masks(model: nn.Module, groups: list[Group], masks: dict[str, torch.Tensor]) -> None:
    """Install each group's boolean mask (None where every unit is live) at its mask points."""
    for group in groups:
        mask = masks[group.name]
        assert mask.shape == (group.size,), (group.name, tuple(mask.shape), group.size)
        value = None if bool(mask.all()) else mask
        for point in group.points:
            model.get_submodule(point.module).set_mask(value)
