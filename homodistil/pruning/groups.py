"""Prunable groups: sets of tensor slices that must be removed together (docs/design.md §2).

Names are parameter / module names inside the module being pruned. Only adapters create
groups from a model's attribute names; everything else treats them as data.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KINDS = ("ffn", "attention", "hidden")


@dataclass(frozen=True)
class Slice:
    """Units of a group index dimension ``dim`` of parameter ``param``.

    A fused projection (GPT-2's ``c_attn`` = [q | k | v]) splits ``dim`` into ``parts`` equal
    consecutive segments, one per group: the group's units are segment ``part``.
    """

    param: str
    dim: int
    part: int = 0
    parts: int = 1

    def span(self, size: int) -> slice:
        """The indices of this slice's segment along ``dim`` when each segment has ``size`` units."""
        return slice(self.part * size, (self.part + 1) * size)


@dataclass(frozen=True)
class MaskPoint:
    """Where a group's mask acts in the forward pass.

    ``out``:  a linear layer's (``nn.Linear``, ``Conv1D``) output units, or an embedding's
              columns, are zeroed; ``part``/``parts`` as in ``Slice`` for a fused projection.
    ``norm``: a LayerNorm or RMSNorm normalises over the live units only and zeroes the rest,
              so the masked residual stream behaves exactly like the shrunk one.
    """

    module: str
    how: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class Group:
    """``size`` units split into ``blocks`` equal blocks (attention heads) that keep equal widths."""

    name: str
    kind: str
    size: int
    slices: tuple[Slice, ...]
    points: tuple[MaskPoint, ...]
    blocks: int = 1

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.size % self.blocks == 0, (self.name, self.size, self.blocks)

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    def with_prefix(self, prefix: str) -> "Group":
        return replace(
            self,
            slices=tuple(replace(s, param=prefix + s.param) for s in self.slices),
            points=tuple(replace(p, module=prefix + p.module) for p in self.points),
        )

    def with_slices(self, extra: tuple[Slice, ...]) -> "Group":
        return replace(self, slices=self.slices + extra)


def slice_tensor(tensor: torch.Tensor, dim: int, keep: torch.Tensor, expected: int, name: str) -> torch.Tensor:
    """Keep indices ``keep`` along ``dim``; ``expected`` is the group size the dim must have."""
    assert tensor.shape[dim] == expected, f"{name}: dim {dim} has {tensor.shape[dim]} units, group has {expected}"
    return tensor.index_select(dim, keep.to(tensor.device)).contiguous()


def _owners(groups: list[Group], names) -> dict[tuple[str, int], list[Group]]:
    """``(param, dim) -> [group of part 0, part 1, …]`` for every pruned dim of the params in ``names``."""
    names, owners = set(names), {}
    for group in groups:
        for s in group.slices:
            if s.param in names:
                parts = owners.setdefault((s.param, s.dim), [None] * s.parts)
                assert parts[s.part] in (None, group), f"{s.param}: dim {s.dim} part {s.part} is in two groups"
                parts[s.part] = group
    for (param, dim), parts in owners.items():
        assert None not in parts, f"{param}: dim {dim} has a segment that no group owns"
        assert all(g.size == parts[0].size for g in parts), f"{param}: dim {dim} segments differ: {[g.size for g in parts]}"
    return owners


def dead_entries(groups: list[Group], masks: dict[str, torch.Tensor], names) -> dict[str, dict[int, torch.Tensor]]:
    """``param -> {dim: live units (bool (units,))}`` over the dims of the params in ``names``
    that have a masked unit (parts of a fused dim concatenated); params without one are absent."""
    dead: dict[str, dict[int, torch.Tensor]] = {}
    for (param, dim), parts in _owners(groups, names).items():
        units = torch.cat([masks[g.name] for g in parts])  # (parts · size,)
        if not bool(units.all()):
            dead.setdefault(param, {})[dim] = units
    return dead


def live_entries(units: dict[int, torch.Tensor], ndim: int) -> torch.Tensor:
    """Bool mask, broadcastable to an ``ndim``-dim tensor, of the entries whose every pruned index
    is live (``units`` from :func:`dead_entries`): an entry in a masked row *or* column is dead,
    e.g. (out, 1) & (1, in) for a matrix pruned along both."""
    live = torch.ones([1] * ndim, dtype=torch.bool)
    for dim, u in units.items():
        shape = [1] * ndim
        shape[dim] = -1
        live = live & u.view(shape)
    return live


def shrink_tensors(tensors: dict[str, torch.Tensor], groups: list[Group],
                   keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice every tensor named in ``groups`` to the kept units; others pass through.

    ``tensors`` maps parameter names to full tensors of the same shape as the parameter
    (the parameter itself, an optimizer moment, an importance state). A dimension split into
    parts keeps, in each segment, the kept units of the group that owns it.
    """
    out = dict(tensors)
    for (param, dim), (units, idx) in kept_indices(groups, keep, tensors).items():
        out[param] = slice_tensor(out[param], dim, idx, units, param)
    return out


def kept_indices(groups: list[Group], keep: dict[str, torch.Tensor],
                 names) -> dict[tuple[str, int], tuple[int, torch.Tensor]]:
    """``(param, dim) -> (units the dim has, kept indices (kept,), ascending where every group's
    ``keep`` is)`` for every pruned dim of the params in ``names``: the cut of :func:`shrink_tensors`,
    one index selection per pruned dim (a 2-D weight: kept rows × kept columns)."""
    out = {}
    for (param, dim), parts in _owners(groups, names).items():
        size = parts[0].size
        out[(param, dim)] = (size * len(parts), torch.cat([p * size + keep[g.name].cpu() for p, g in enumerate(parts)]))
    return out


def live_numel(shapes: dict[str, tuple[int, ...]], groups: list[Group], masks: dict[str, torch.Tensor]) -> int:
    """Parameters the model would have if shrunk to ``masks`` now (over the names in ``shapes``)."""
    live: dict[tuple[str, int], int] = {}
    for g in groups:
        n = int(masks[g.name].sum())
        for s in g.slices:
            live[(s.param, s.dim)] = live.get((s.param, s.dim), 0) + n  # summed over a fused dim's parts
    total = 0
    for name, shape in shapes.items():
        numel = 1
        for dim, size in enumerate(shape):
            numel *= live.get((name, dim), size)
        total += numel
    return total
