"""Parameters and Adam state out of, and back into, a DeepSpeed engine at ZeRO stage 0-3.

ZeRO flattens and partitions parameters and optimizer state, so a shape change needs a
rebuilt engine (docs/design.md §4). A shrink streams the state one parameter at a time
(:func:`stream_pieces`): the fp32 value and both Adam moments of one parameter, cut to the kept
units, of which each rank keeps only its *piece* — flat elements ``[r·part, (r+1)·part)``,
``part = ceil(numel / ws)``, zero-padded, on the host. A small parameter is read whole; a large
2-D one (above :data:`CHUNK_BYTES` in fp32: the embeddings, the LM head, wide projections) in
chunks of old rows of at most :data:`CHUNK_BYTES`, each assembled from the ranks' own fragments
by one all-reduce, so no rank ever holds a whole large tensor, only its own share of the kept
state, one chunk and one small parameter. The smaller engine is built, and
:func:`restore` writes the pieces back, again one parameter at a time. Reads and writes are
collectives: every rank calls these functions, for the same parameters, in the same order.

The pieces are cut as ZeRO-3 cuts its partitions, so at ZeRO-3 each rank writes its piece into
its own partition with no communication. ZeRO-1/2 partition the flat buffer of a whole parameter
group, whose cuts fall anywhere inside a parameter, and stage 0 keeps everything whole: there
:func:`restore` all-gathers one parameter from the pieces and writes it with the full setters.

Restoring Adam's moments uses DeepSpeed internals (pinned: deepspeed==0.19.8, see
CPU-FACTS): after ``deepspeed.initialize`` the optimizer has no state yet, so state is created
for each flat fp32 partition, linked to the parameters' fragments
(``_lazy_init_hp_params_optimizer_state`` at stages 1/2 and for the bf16 optimizer), then
filled with ``safe_set_full_optimizer_state`` (ZeRO-1/2) or ``safe_set_local_*`` (ZeRO-3).
DeepSpeed's full-tensor ZeRO-3 setter (``set_full_hp_param``) narrows the unpadded value and
fails whenever ``ws`` does not divide ``n``: one more reason to write pieces at ZeRO-3.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state)

from homodistil.cost import SHRINK_CHUNK_BYTES
from homodistil.engine.fragments import local_values
from homodistil.pruning.groups import Group, kept_indices, slice_tensor

MOMENTS = ("exp_avg", "exp_avg_sq")
STATE = ("param", *MOMENTS)  # what a shrink carries of each parameter: its fp32 value and Adam moments
CHUNK_BYTES = SHRINK_CHUNK_BYTES  # a 2-D parameter above this fp32 size is streamed in row chunks of at most this size


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _is_partitioned(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_param(param) -> torch.Tensor:
    """The full fp32 master value of a parameter (module value at plain stage 0)."""
    value = safe_get_full_fp32_param(param) if _is_partitioned(param) else None
    return (param.detach() if value is None else value).float().clone()


def full_moments(engine, param) -> dict[str, torch.Tensor]:
    if _is_partitioned(param):
        return {k: safe_get_full_optimizer_state(param, k).float().clone() for k in MOMENTS}
    state = _base_optimizer(engine).state.get(param, {})
    return {k: state[k].float().clone() if k in state else torch.zeros_like(param, dtype=torch.float32)
            for k in MOMENTS}


def local_partition(full: torch.Tensor, rank: int, part: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full``: flat elements ``[rank·part, (rank+1)·part)``,
    zero-padded to ``part`` (= ceil(numel / ws)) where the tensor ends inside or before it."""
    flat = full.flatten()
    start = min(rank * part, flat.numel())
    piece = flat[start:start + part]
    return torch.cat([piece, piece.new_zeros(part - piece.numel())])  # (part,)


def own_piece(full: torch.Tensor) -> torch.Tensor:
    """This rank's piece (:func:`local_partition`) of a full tensor, on the host."""
    world = dist.get_world_size()
    return local_partition(full, dist.get_rank(), -(-full.numel() // world)).cpu()


def own_pieces(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's pieces of one parameter's full tensors (keys :data:`STATE`: the fp32 value and
    the Adam moments)."""
    return {k: own_piece(v) for k, v in full.items()}


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


def _full_fp32(engine, param, key: str) -> torch.Tensor:
    """One full fp32 tensor of :data:`STATE` (the caller only reads it: no copy where DeepSpeed's
    getters already return a new tensor)."""
    if not _is_partitioned(param):
        return full_param(param) if key == "param" else full_moments(engine, param)[key]
    value = safe_get_full_fp32_param(param) if key == "param" else safe_get_full_optimizer_state(param, key)
    return value.float()


def gather(engine) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int]:
    """(params, moments, adam_step), full fp32 in host memory, identical on every rank: the whole
    model on every rank, for the export (and the tests' references), never during training."""
    params, moments = {}, {}
    _link_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        params[name] = full_param(p).cpu()
        moments[name] = {k: v.cpu() for k, v in full_moments(engine, p).items()}
    return params, moments, optimizer_step_count(engine)


def stream_pieces(engine, groups: list[Group], keep: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """(pieces, adam_step): for every parameter, this rank's pieces of its fp32 value and both Adam
    moments (keys :data:`STATE`) cut to the units ``keep`` of ``groups`` (``shrink_tensors``' cut),
    read one parameter at a time.

    Holds at once, beyond the engine: this rank's pieces of everything cut so far (host memory: 12
    bytes per kept parameter / world size) and either one small parameter's full tensor (DeepSpeed's
    gather buffer and its result) and its cut copy, or one row chunk of a large one (at most
    :data:`CHUNK_BYTES`) and its cut copies, on the engine's device.
    """
    _link_optimizer_state(engine)
    named = dict(engine.module.named_parameters())
    cuts: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}  # name -> {dim: (units, kept indices)}
    for (name, dim), cut in kept_indices(groups, keep, named).items():
        cuts.setdefault(name, {})[dim] = cut
    pieces = {}
    for name, p in named.items():
        shape, dims = _full_shape(p), cuts.get(name, {})
        if len(shape) == 2 and 4 * shape[0] * shape[1] > CHUNK_BYTES:
            pieces[name] = {k: chunked_piece(engine, p, k, dims) for k in STATE}
        else:
            pieces[name] = {k: own_piece(_cut(_full_fp32(engine, p, k), dims, name)) for k in STATE}
    return pieces, optimizer_step_count(engine)


def _full_shape(param) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)


def _cut(full: torch.Tensor, dims: dict[int, tuple[int, torch.Tensor]], name: str) -> torch.Tensor:
    """``full`` with only the kept indices along each pruned dim (``dims`` from ``kept_indices``)."""
    for dim, (units, idx) in dims.items():
        full = slice_tensor(full, dim, idx, units, name)
    return full


def _copy_overlap(dst: torch.Tensor, dst_start: int, src: torch.Tensor, src_start: int) -> None:
    """Copy into flat ``dst`` (elements ``[dst_start, …)`` of some tensor) the elements of flat ``src``
    (``[src_start, …)`` of the same tensor) that both hold."""
    lo, hi = max(dst_start, src_start), min(dst_start + dst.numel(), src_start + src.numel())
    if lo < hi:
        dst[lo - dst_start:hi - dst_start] = src[lo - src_start:hi - src_start].to(dst.device)


def _gather_rows(engine, start: int, local: torch.Tensor, r0: int, r1: int, cols: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` (r1 - r0, cols) of the full tensor whose flat fragment ``[start, …)`` this rank
    holds (a collective). Every rank writes its overlap into a chunk of −0.0 and one all-reduce sums
    them: the fragments are disjoint, and x + (−0.0) = x for every x, so the sum is bit-exact."""
    chunk = torch.full(((r1 - r0) * cols,), -0.0, dtype=torch.float32, device=engine.device)
    _copy_overlap(chunk, r0 * cols, local, start)
    dist.all_reduce(chunk)
    return chunk.view(r1 - r0, cols)


def chunked_piece(engine, param, key: str, dims: dict[int, tuple[int, torch.Tensor]]) -> torch.Tensor:
    """This rank's piece (part,) of one 2-D :data:`STATE` tensor (rows, cols) cut to ``dims`` (kept
    rows × kept columns), read in chunks of old rows of at most :data:`CHUNK_BYTES`: equal to
    ``own_piece(cut(full))`` without any rank holding ``full`` (a collective: every rank, same order)."""
    rows, cols = _full_shape(param)
    for dim, size in enumerate((rows, cols)):
        assert dim not in dims or dims[dim][0] == size, f"dim {dim} has {size} units, its group {dims[dim][0]}"
    kept_rows = dims[0][1] if 0 in dims else torch.arange(rows)  # (rows',) ascending
    kept_cols = dims[1][1].to(engine.device) if 1 in dims else None  # (cols',) or all
    assert bool((kept_rows.diff() > 0).all()), "kept rows must ascend: the cut rows of a chunk are consecutive"
    new_cols = cols if kept_cols is None else kept_cols.numel()
    world, rank = dist.get_world_size(), dist.get_rank()
    part = -(-kept_rows.numel() * new_cols // world)
    piece = torch.zeros(part)  # (part,) host: flat [rank·part, (rank+1)·part) of the cut tensor, zero-padded
    start, local = local_values(param, key, _base_optimizer(engine))
    step = max(1, CHUNK_BYTES // (4 * cols))  # old rows per chunk
    written = 0  # kept rows before the chunk: its cut rows are new rows [written, written + k)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        in_chunk = kept_rows[(kept_rows >= r0) & (kept_rows < r1)] - r0  # (k,), the same on every rank
        if not in_chunk.numel():
            continue
        cut = _gather_rows(engine, start, local, r0, r1, cols).index_select(0, in_chunk.to(engine.device))  # (k, cols)
        if kept_cols is not None:
            cut = cut.index_select(1, kept_cols)  # (k, cols')
        _copy_overlap(piece, rank * part, cut.reshape(-1), written * new_cols)
        written += in_chunk.numel()
    return piece


def _unshard(piece: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
    """The full flat tensor (numel,) from every rank's piece (an all-gather; NCCL needs the device)."""
    piece = piece.to(device)
    parts = [torch.empty_like(piece) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, piece)
    return torch.cat(parts)[:numel]


def restore(engine, pieces: dict[str, dict[str, torch.Tensor]], adam_step: int) -> None:
    """Write this rank's pieces (:func:`stream_pieces`, :func:`own_pieces`) of every parameter's fp32
    value and Adam moments into a freshly initialised engine, one parameter at a time (the module's
    weights too: it was built with throw-away initial values)."""
    named = dict(engine.module.named_parameters())
    assert set(named) == set(pieces), sorted(set(named) ^ set(pieces))
    base = _base_optimizer(engine)
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
    _link_optimizer_state(engine)
    with torch.no_grad():
        for name, p in named.items():
            if hasattr(p, "ds_id"):
                _write_zero3_pieces(p, pieces.pop(name))
            else:
                _write_full(base, p, pieces.pop(name))


def _write_zero3_pieces(param, pieces: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: the pieces are this rank's partitions (padded alike): the module's (``ds_tensor``),
    the fp32 master's and the moments'."""
    assert pieces["param"].numel() == param.partition_numel(), (pieces["param"].numel(), param.partition_numel())
    value = pieces["param"].to(param.ds_tensor.device)
    param.ds_tensor.copy_(value)
    safe_set_local_fp32_param(param, value)
    for k in MOMENTS:
        safe_set_local_optimizer_state(param, pieces[k].to(param.ds_tensor.device), k)


def _write_full(base, param, pieces: dict[str, torch.Tensor]) -> None:
    """ZeRO 0-2: one full tensor at a time, all-gathered from the pieces, into the module's
    (replicated) weight, then the rank's fragments of the fp32 master and moments (ZeRO-1/2, the
    bf16 optimizer) or the torch optimizer's whole state (stage 0)."""
    for k in STATE:
        full = _unshard(pieces[k], param.numel(), param.device).view(param.shape)
        if k == "param":
            param.copy_(full)
            if _is_partitioned(param):
                safe_set_full_fp32_param(param, full)
        elif _is_partitioned(param):
            safe_set_full_optimizer_state(param, full, k)
        else:
            base.state[param][k] = full.to(param.dtype)


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
