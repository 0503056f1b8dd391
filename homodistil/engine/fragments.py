"""Each rank's own piece of every scored parameter, for rank-local importance (docs/design.md §5).

A fragment is a flat element range ``[start, start + n)`` of a row-major parameter, with this
rank's fp32 master values and rank-averaged gradient for it. Between ``engine.backward`` at the
accumulation boundary and ``engine.step()``:

- ZeRO-3: the local shard, ``[r·part, (r+1)·part)`` clipped to the parameter (``part`` =
  ``partition_numel()``; the last rank's padding dropped), through DeepSpeed's public
  ``safe_get_local_fp32_param`` / ``safe_get_local_grad``;
- ZeRO-1/2 (and the bf16 optimizer): the fp32 master fragment the rank's optimizer owns,
  ``param._hp_mapping`` (``lp_fragment_address`` is its range; the gradient fragment comes from
  ``get_lp_grad_fragment``; ``_hp_mapping`` is None where the rank owns none of it). These are
  DeepSpeed internals (pinned: deepspeed==0.19.8; tests/test_importance_local.py checks them
  against the full tensors);
- plain stage 0 (replicated weights, all-reduced gradients): the ZeRO-3 split of each
  parameter, so the ranks share the work evenly.

The fragments of all ranks are disjoint and cover each parameter, so a sum over ranks of
per-fragment row/column sums is the full tensor's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state


def _split(numel: int, part: int, rank: int) -> tuple[int, int]:
    start = min(rank * part, numel)
    return start, min(part, numel - start)


class _Zero3:
    """ZeRO-3: the local shard ``[r·part, (r+1)·part)`` clipped to the parameter, padding dropped."""

    @staticmethod
    def range(param, rank: int, world: int) -> tuple[int, int]:
        return _split(param.ds_numel, param.partition_numel(), dist.get_rank(group=param.ds_process_group))

    @staticmethod
    def values(param, key: str, start: int, numel: int, optimizer) -> torch.Tensor:
        local = safe_get_local_fp32_param(param) if key == "param" else safe_get_local_optimizer_state(param, key)
        return local.view(-1)[:numel]

    @staticmethod
    def grad(param, start: int, numel: int) -> torch.Tensor:
        return safe_get_local_grad(param).view(-1)[:numel]


class _Mapped:
    """ZeRO-1/2 and the bf16 optimizer: the fp32 fragment this rank's optimizer owns (``_hp_mapping``,
    None where it owns none of the parameter)."""

    @staticmethod
    def range(param, rank: int, world: int) -> tuple[int, int]:
        mapping = param._hp_mapping
        return (0, 0) if mapping is None else (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)

    @staticmethod
    def values(param, key: str, start: int, numel: int, optimizer) -> torch.Tensor:
        mapping = param._hp_mapping
        if mapping is None:
            return torch.zeros(0, dtype=torch.float32, device=param.device)
        return (mapping.get_hp_fragment() if key == "param" else mapping.get_optim_state_fragment(key)).view(-1)

    @staticmethod
    def grad(param, start: int, numel: int) -> torch.Tensor:
        mapping = param._hp_mapping
        if mapping is None:
            return torch.zeros(0, dtype=torch.float32, device=param.device)
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
        if grad.numel() == param.numel() and numel != param.numel():  # the bf16 optimizer's full buffer
            grad = grad.narrow(0, start, numel)
        return grad


class _Replicated:
    """Plain stage 0: the module and torch's optimizer state are whole on every rank; split as ZeRO-3
    splits, so the ranks share the work evenly."""

    @staticmethod
    def range(param, rank: int, world: int) -> tuple[int, int]:
        return _split(param.numel(), -(-param.numel() // world), rank)

    @staticmethod
    def values(param, key: str, start: int, numel: int, optimizer) -> torch.Tensor:
        value = param.detach() if key == "param" else optimizer.state.get(param, {}).get(key)
        if value is None:  # no optimizer step yet: Adam's moments are zero
            return torch.zeros(numel)
        return value.float().view(-1)[start:start + numel]

    @staticmethod
    def grad(param, start: int, numel: int) -> torch.Tensor:
        return param.grad.view(-1)[start:start + numel]


def layout(param):
    """How ``param``'s fp32 values, optimizer state and gradient are laid out over the ranks: the one
    place that tells ZeRO-3, ZeRO-1/2 and plain stage 0 apart (``range``, ``values``, ``grad``)."""
    if hasattr(param, "ds_id"):
        return _Zero3
    if hasattr(param, "_hp_mapping"):
        return _Mapped
    return _Replicated


def fragment_range(param, rank: int, world: int) -> tuple[int, int]:
    """(start, numel) of this rank's fragment of ``param``."""
    return layout(param).range(param, rank, world)


def local_values(param, key: str, optimizer=None) -> tuple[int, torch.Tensor]:
    """(start, fp32 values (n,)) of this rank's fragment of ``param`` (``key`` "param") or of its
    optimizer state ``key`` (``exp_avg``, ``exp_avg_sq``; ``optimizer``: the base torch optimizer,
    read at plain stage 0)."""
    place = layout(param)
    start, numel = place.range(param, dist.get_rank(), dist.get_world_size())
    return start, place.values(param, key, start, numel, optimizer)


def fragment(param, rank: int, world: int, with_grad: bool) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(start, fp32 master values (n,), rank-averaged gradient (n,) or None) of this rank's fragment."""
    place = layout(param)
    start, numel = place.range(param, rank, world)
    weight = place.values(param, "param", start, numel, None)
    grad = place.grad(param, start, numel) if with_grad else None
    return start, weight.detach(), None if grad is None else grad.detach()  # the fp32 master is a leaf that needs grad


def gather_fragments(local: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """The full flat tensor (numel,) from every rank's fragment ``local`` at ``start`` (a collective:
    every rank, same order); the fragments are disjoint, so a sum of zero-padded pieces is exact."""
    full = torch.zeros(numel, dtype=local.dtype, device=local.device)
    full[start:start + local.numel()] = local
    dist.all_reduce(full)
    return full
