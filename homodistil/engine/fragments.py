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
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad


def _split(numel: int, part: int, rank: int) -> tuple[int, int]:
    start = min(rank * part, numel)
    return start, min(part, numel - start)


def fragment_range(param, rank: int, world: int) -> tuple[int, int]:
    """(start, numel) of this rank's fragment of ``param``."""
    if hasattr(param, "ds_id"):
        return _split(param.ds_numel, param.partition_numel(), dist.get_rank(group=param.ds_process_group))
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return (0, 0) if mapping is None else (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return _split(param.numel(), -(-param.numel() // world), rank)


def fragment(param, rank: int, world: int, with_grad: bool) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(start, fp32 master values (n,), rank-averaged gradient (n,) or None) of this rank's fragment."""
    start, numel = fragment_range(param, rank, world)
    if hasattr(param, "ds_id"):
        weight = safe_get_local_fp32_param(param).view(-1)[:numel]
        grad = safe_get_local_grad(param).view(-1)[:numel] if with_grad else None
    elif hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:
            empty = torch.zeros(0, dtype=torch.float32, device=param.device)
            return start, empty, empty if with_grad else None
        weight = mapping.get_hp_fragment().view(-1)
        grad = None
        if with_grad:
            grad = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
            if grad.numel() == param.numel() and numel != param.numel():  # the bf16 optimizer's full buffer
                grad = grad.narrow(0, start, numel)
    else:
        weight = param.detach().view(-1)[start:start + numel]
        grad = param.grad.view(-1)[start:start + numel] if with_grad else None
    return start, weight.detach(), None if grad is None else grad.detach()  # the fp32 master is a leaf that needs grad


def gather_fragments(local: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """The full flat tensor (numel,) from every rank's fragment ``local`` at ``start`` (a collective:
    every rank, same order); the fragments are disjoint, so a sum of zero-padded pieces is exact."""
    full = torch.zeros(numel, dtype=local.dtype, device=local.device)
    full[start:start + local.numel()] = local
    dist.all_reduce(full)
    return full
