"""Full tensors out of, and back into, a DeepSpeed engine at ZeRO stage 0-3.

ZeRO flattens and partitions parameters and optimizer state, so a shape change needs a
rebuilt engine (docs/design.md §4): read everything as full fp32 tensors, slice, build a smaller
engine, write the sliced state back. Reads are collectives at ZeRO-3: every rank calls
these functions, for the same parameters, in the same order.

Restoring Adam's moments uses DeepSpeed internals (pinned: deepspeed==0.19.8, see
CPU-FACTS): after ``deepspeed.initialize`` the optimizer has no state yet, so state is created
for each flat fp32 partition, linked to the parameters' fragments
(``_lazy_init_hp_params_optimizer_state`` at stages 1/2 and for the bf16 optimizer), then
filled with ``safe_set_full_optimizer_state``.

ZeRO-3 pads: a tensor of n elements is held as ``ceil(n / ws)`` elements per rank, the last
rank's piece padded. DeepSpeed's full-tensor setter (``set_full_hp_param``) narrows the unpadded
value and fails whenever ``ws`` does not divide ``n``, so ZeRO-3 writes go through
:func:`local_partition` and DeepSpeed's per-rank setters instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

MOMENTS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _is_partitioned(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_param(param) -> torch.Tensor:
    """The full fp32 master value of a parameter (module value at plain stage 0)."""
    value = safe_get_full_fp32_param(param) if _is_partitioned(param) else None
    return (param.detach() if value is None else value).float().clone()


def full_grad(param) -> torch.Tensor | None:
    """The full rank-averaged gradient; valid between backward and step at the boundary."""
    grad = safe_get_full_grad(param)
    return None if grad is None else grad.float()


def full_moments(engine, param) -> dict[str, torch.Tensor]:
    if _is_partitioned(param):
        return {k: safe_get_full_optimizer_state(param, k).float().clone() for k in MOMENTS}
    state = _base_optimizer(engine).state.get(param, {})
    return {k: state[k].float().clone() if k in state else torch.zeros_like(param, dtype=torch.float32)
            for k in MOMENTS}


def local_partition(full: torch.Tensor, rank: int, part: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 piece of ``full``: flat elements ``[rank·part, (rank+1)·part)``,
    zero-padded to ``part`` (= ceil(numel / ws)) where the tensor ends inside or before it."""
    flat = full.flatten()
    start = min(rank * part, flat.numel())
    piece = flat[start:start + part]
    return torch.cat([piece, piece.new_zeros(part - piece.numel())])  # (part,)


def _set_zero3(param, value: torch.Tensor, key: str | None = None) -> None:
    """Write this rank's padded piece of the full ``value`` into a ZeRO-3 parameter's fp32
    master (``key`` None) or its optimizer state ``key``."""
    piece = local_partition(value, dist.get_rank(group=param.ds_process_group), param.partition_numel())
    if key is None:
        safe_set_local_fp32_param(param, piece)
    else:
        safe_set_local_optimizer_state(param, piece, key)


def set_full(param, value: torch.Tensor, key: str | None = None) -> None:
    """Write a full fp32 value (``key`` None) or optimizer state into a partitioned parameter."""
    value = value.to(param.device)
    if hasattr(param, "ds_id"):
        _set_zero3(param, value, key)
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def optimizer_step_count(engine) -> int:
    """Adam's bias-correction step (the same for every parameter in our groups)."""
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _link_optimizer_state(engine) -> None:
    """(Re)build the parameters' views into Adam's flat state (stages 1/2, bf16 optimizer).

    DeepSpeed links them once, possibly before the first step created any state, which
    leaves empty views behind; relinking after the state exists makes them valid.
    """
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def gather(engine) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int]:
    """(params, moments, adam_step), full fp32 in host memory, identical on every rank.

    Host memory, not the accelerator's: 12 bytes per parameter (weight, Adam m and v) would not
    fit next to the model on a GPU for a multi-billion-parameter student (``homodistil plan``
    reports the host memory a shrink needs per node).
    """
    params, moments = {}, {}
    _link_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        params[name] = full_param(p).cpu()
        moments[name] = {k: v.cpu() for k, v in full_moments(engine, p).items()}
    return params, moments, optimizer_step_count(engine)


def restore(engine, params: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]], adam_step: int) -> None:
    """Write full fp32 params and Adam moments into a freshly initialised engine."""
    named = dict(engine.module.named_parameters())
    assert set(named) == set(params), sorted(set(named) ^ set(params))
    base = _base_optimizer(engine)
    partitioned = any(_is_partitioned(p) for p in named.values())
    # The flat fp32 partitions the parameters' fragments point into: stage 3 lends them to the
    # torch optimizer only inside step(), so its param_groups cannot be used to find them.
    flats = next((getattr(engine.optimizer, attr) for attr in (
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_groups_flat_partition",  # the bf16 optimizer (bf16 at stage 0)
    ) if getattr(engine.optimizer, attr, None)), [flat for group in base.param_groups for flat in group["params"]])
    # torch's Adam keeps "step" on the parameter's device when fused or capturable (fused=True on
    # CUDA: a CPU step fails the fused kernel's device check), else on the CPU
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for flat in flats:
        step = torch.tensor(float(adam_step), dtype=torch.float32, device=flat.device if on_device else "cpu")
        base.state[flat] = {"step": step,
                            **{k: torch.zeros_like(flat, dtype=torch.float32) for k in MOMENTS}}
    if partitioned:
        _link_optimizer_state(engine)
        for name, p in named.items():
            assert params[name].numel() == (p.ds_numel if hasattr(p, "ds_id") else p.numel()), name
            set_full(p, params[name])
            for k in MOMENTS:
                set_full(p, moments[name][k], k)
    else:
        for name, p in named.items():
            assert p.shape == params[name].shape, (name, tuple(p.shape), tuple(params[name].shape))
            base.state[p].update({k: moments[name][k].to(p.device, p.dtype) for k in MOMENTS})


def restore_torch_linear() -> None:
    """Undo DeepSpeed's process-wide ``torch.nn.functional.linear`` patch.

    Building a ZeRO-3 engine (``zero.Init``) replaces ``F.linear`` with its memory-efficient
    version for the whole process, "until manually reset" (DeepSpeed's words), and that version
    fails on zero-width outputs. A finished run resets it, so that what runs next in the same
    process (another run, an evaluation, a test) gets torch's own.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses  # noqa: PLC0415

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original
