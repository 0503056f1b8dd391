"""Maskable drop-ins for the layers that groups mask (same parameters, same state-dict keys).

While masks are live the student computes exactly what its shrunk version would compute,
scattered back to full width: masked outputs of linear layers and embedding columns are 0,
and a masked norm takes its statistics over the live units only. Without a mask each behaves
like its base layer. :class:`OutMasked` and :class:`NormMasked` are the bases of every
drop-in; the adapters add their families' own (GPT-2's ``Conv1D``, the Llama family's RMSNorm).

A masked linear layer is ``F.linear × mask`` (:func:`masked_linear`): on an H200 it beat a Triton
GEMM that skipped masked rows at every masked fraction measured, 2.4-4.5× (docs/gpu.md), and that
kernel is gone. A masked layer still pays for its masked rows; the recipe shrinks soon after
masking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from homodistil.kernels._dispatch import kernel_range

from .groups import Group, MaskPoint


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  keep: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, W, b) ⊙ m``: x (..., K), weight (N, K), bias (N,), ``keep`` (N,) bool on x's device
    -> y (..., N) with masked outputs exactly 0 (bias included) and their weight and bias gradients 0.
    This equals ``F.linear`` on the shrunk matrix, scattered back to full width. Under autocast
    ``F.linear`` casts, and the mask follows y's dtype."""
    with kernel_range("masked_linear.forward", x):
        y = F.linear(x, weight, bias)
        return y * keep.to(y.dtype)


def _take_over(cls, module: nn.Module):
    """An instance of ``cls`` that shares ``module``'s parameters, buffers and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    return new


class OutMasked(nn.Module):
    """Output units outside ``out_mask`` are forced to 0. A fused projection gets one mask per
    part (``set_mask(mask, part, parts)``); ``out_mask`` is their concatenation (None: all live).
    Its copy on the compute device is made once per mask update, on the first forward after it."""

    out_mask: torch.Tensor | None = None
    _part_masks: tuple = ()
    _keep: torch.Tensor | None = None

    @classmethod
    def wrap(cls, module: nn.Module):
        new = _take_over(cls, module)
        new.out_mask, new._part_masks, new._keep = None, (), None
        return new

    def keep(self, device: torch.device) -> torch.Tensor:
        """``out_mask`` (N,) bool on ``device`` (cached until the next mask)."""
        if self._keep is None or self._keep.device != device:
            self._keep = self.out_mask.to(device)
        return self._keep

    def set_mask(self, mask: torch.Tensor | None, part: int = 0, parts: int = 1) -> None:
        masks = list(self._part_masks) if len(self._part_masks) == parts else [None] * parts
        masks[part] = mask
        self._part_masks = tuple(masks)
        self._keep = None
        if all(m is None for m in masks):
            self.out_mask = None
            return
        some = next(m for m in masks if m is not None)  # every part has the same number of units
        self.out_mask = torch.cat([torch.ones_like(some) if m is None else m for m in masks])


class MaskedLinear(OutMasked, nn.Linear):
    """``y = x Wᵀ + b`` (W: (out, in)) with masked output units 0 (:func:`masked_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_mask is None:
            return F.linear(x, self.weight, self.bias)
        return masked_linear(x, self.weight, self.bias, self.keep(x.device))


class MaskedEmbedding(OutMasked, nn.Embedding):
    """An embedding whose masked columns (hidden units) are 0: the residual stream of a
    pre-norm model (GPT-2, Llama) then holds exact zeros at masked units, as the shrunk one
    has no such units (its hidden states, read by the hidden-state loss, match)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = nn.Embedding.forward(self, ids)
        return y if self.out_mask is None else y * self.out_mask.to(y.device, y.dtype)


class NormMasked(nn.Module):
    """A norm over the live units ``mask`` only; masked units output exactly 0."""

    live: torch.Tensor | None = None

    @classmethod
    def wrap(cls, norm: nn.Module):
        new = _take_over(cls, norm)
        new.live = None
        return new

    def set_mask(self, mask: torch.Tensor | None, part: int = 0, parts: int = 1) -> None:
        assert parts == 1, "a norm has no parts"
        self.live = None if mask is None else mask.nonzero().squeeze(1)


class MaskedLayerNorm(NormMasked, nn.LayerNorm):
    """LayerNorm (statistics and affine over the live units only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., d)
        if self.live is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        live = self.live.to(x.device)
        y = F.layer_norm(x.index_select(-1, live), (live.numel(),),
                         self.weight.index_select(0, live), self.bias.index_select(0, live), self.eps)
        return x.new_zeros(x.shape).index_copy(-1, live, y)  # (..., d), zeros where masked


# The drop-in of each torch layer the adapters mask. An adapter adds its family's own layers
# (GPT-2's Conv1D, the Llama family's RMSNorm) in its ``drop_ins``: this file knows no model.
DROP_INS: dict[type, type] = {nn.Linear: MaskedLinear, nn.Embedding: MaskedEmbedding, nn.LayerNorm: MaskedLayerNorm}


def _wrapper(module: nn.Module, point: MaskPoint, drop_ins: dict[type, type]):
    wrapper = {**DROP_INS, **drop_ins}.get(type(module))
    if wrapper is None or (point.how == "norm") != issubclass(wrapper, NormMasked):
        raise AssertionError(f"{point.module}: no maskable drop-in for {type(module).__name__} ({point.how})")
    return wrapper


def make_maskable(model: nn.Module, groups: list[Group], drop_ins: dict[type, type]) -> None:
    """Swap every module named by a group's mask points for its maskable drop-in: ``DROP_INS``
    for torch's layers, ``drop_ins`` (the adapter's) for the family's own."""
    for group in groups:
        for point in group.points:
            module = model.get_submodule(point.module)
            if isinstance(module, (OutMasked, NormMasked)):
                continue
            parent_name, _, attr = point.module.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _wrapper(module, point, drop_ins).wrap(module))


def apply_masks(model: nn.Module, groups: list[Group], masks: dict[str, torch.Tensor]) -> None:
    """Install each group's boolean mask (None where every unit is live) at its mask points."""
    for group in groups:
        mask = masks[group.name]
        assert mask.shape == (group.size,), (group.name, tuple(mask.shape), group.size)
        value = None if bool(mask.all()) else mask
        for point in group.points:
            model.get_submodule(point.module).set_mask(value, point.part, point.parts)
