"""Atomic checkpoints: DeepSpeed's sharded model/optimizer files plus our run state.

Layout under ``<output_dir>/checkpoints/``::

    latest                      tag of the newest *complete* checkpoint (atomic rename)
    step00000040/               DeepSpeed files (model, optimizer, LR scheduler; per rank)
        meta.json               step, widths, teacher config, tokenizer: enough to rebuild
        pruner.pt               masks, scores, counters (identical on all ranks)
        rank{r}.pt              each rank's RNG state (torch/python/numpy), data position and
                                importance state (PLATON's, of the rank's own fragments)
        MANIFEST.json           every other file's size and CRC-32, written before COMPLETE
        COMPLETE                written last, after every rank finished

An interrupted save (a killed process, a full disk) leaves a directory without ``COMPLETE``;
``latest`` still names the previous checkpoint, resuming ignores the partial one and the
next save or resume deletes it. Before writing, every rank checks that the file system has
room for one more checkpoint (the size of the newest one, or an estimate for the first), so a
full disk stops the run with one line instead of a half-written checkpoint; an ``OSError``
while writing our own files (ENOSPC, EIO) removes the partial checkpoint and stops the same way.

``COMPLETE`` says the files were written; ``MANIFEST.json`` says what they were. Resuming checks
every file's size and CRC-32 against it (the ranks share the files out); a damaged checkpoint
(a truncated shard, flipped bits on a shared file system) is renamed aside to
``stepNNNNNNNN.damaged``, reported in one line naming the file, and the run resumes from the
previous complete checkpoint. A checkpoint written before manifests existed is not checked.

Opening a checkpoint runs no code from it. Every file is unpickled with ``weights_only=True``
(:func:`safe_load`: tensors, plain data and the few types of :func:`_allowed_globals`), and
DeepSpeed's own readers, which unpickle without the weights-only guard, only see a checkpoint whose
every ``*.pt`` file passed that first (:func:`check_loadable`); anything else stops the command
with one line naming the file. Nothing read from a checkpoint becomes a path outside it:
``latest`` must hold a tag (``stepNNNNNNNN``; anything else is ignored, reported in one line) and
a manifest naming a file elsewhere (``/``, ``\\``, ``..``) is a damaged checkpoint, its named
files never opened. Checkpoint directories are created owner-only (:mod:`.private`), so no one
else can read them or swap a file between the check and DeepSpeed's read.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import faults
from .dist import device
from .private import private_dir

LATEST, COMPLETE, META, PRUNER, MANIFEST = "latest", "COMPLETE", "meta.json", "pruner.pt", "MANIFEST.json"
TAG = re.compile(r"^step\d{8}$")  # a checkpoint directory (one renamed aside no longer matches)
CHUNK = 2**22  # bytes read at a time when checksumming


class CheckpointError(OSError):
    """A checkpoint cannot be written (no space, an I/O error) or read safely: printed as one line."""


def _fsync(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory entry itself to disk."""
    for path in [*sorted(p for p in directory.iterdir() if p.is_file()), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _allowed_globals() -> list:
    """The only non-tensor types our checkpoints hold, for ``weights_only`` loading: numpy's RNG state
    in ``rank*.pt`` (a uint32 array) and, in DeepSpeed's optimizer shards, its loss scaler (the
    dynamic one in fp16 runs), ZeRO stage and fragment address. Building any of them runs no code
    the file chooses: a class is created empty and its fields filled in, an enum looked up by value."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _refusal(err: Exception) -> str:
    """Why torch refused to unpickle a file, in a few words (its message spans a dozen lines)."""
    text = str(err).strip()
    if found := UNSAFE_GLOBAL.search(text):
        return f"it asks to call {found.group(1)}, and a checkpoint holds only tensors and plain data"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return f"{type(err).__name__}: {detail[:120]}"


def safe_load(path: Path, map_location=None, mmap: bool = False):
    """``torch.load`` that can build only tensors, plain data and :func:`_allowed_globals`: a file
    asking for anything else (a pickled call such as ``os.system``) is refused before any of it
    runs, and a file torch cannot read at all (truncated, not a torch file) the same way, as one
    line naming it (:class:`CheckpointError`). ``mmap``: map the tensors instead of reading them."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"refused to load {path}: {_refusal(err)} (nothing in it was run)") from None


def check_loadable(directory: Path) -> None:
    """Unpickle every ``*.pt`` file of checkpoint ``directory`` with :func:`safe_load` before anything
    else opens one: DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32`` unpickle
    without the weights-only guard. Memory-mapped, so this reads each file's pickle, not its tensors; a
    file in torch's old (non-zip) format cannot be mapped and is refused (neither we nor DeepSpeed
    write one)."""
    for path in sorted(directory.glob("*.pt")):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"refused to load {path}: not a torch.save archive (nothing in it was run)")
        safe_load(path, map_location="cpu", mmap=True)


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG.match(p.name) and (p / COMPLETE).exists())


def read_latest(root: Path) -> tuple[str | None, str | None]:
    """(the tag ``latest`` names, or None; why it was ignored, as one line, or None). Its text
    becomes a path only when it is a tag: ``../../elsewhere`` must not lead a resume to rename or
    read a directory outside ``root``. At most 64 bytes are read; the line quotes what was found."""
    latest = root / LATEST
    if not latest.is_file():
        return None, None
    try:
        with latest.open("rb") as f:
            text = f.read(64).decode("utf-8", "replace").strip()
    except OSError as err:
        return None, f"ignored {latest}: unreadable ({err.strerror})"
    if TAG.fullmatch(text):
        return text, None
    return None, f"ignored {latest}: it holds {text!r}, not a checkpoint tag (stepNNNNNNNN)"


def find_latest(root: Path) -> str | None:
    """The newest complete checkpoint's tag (``latest`` if it is a complete tag, else the last complete one)."""
    tag, _ = read_latest(root)
    if tag is not None and (root / tag / COMPLETE).exists():
        return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def remove_incomplete(root: Path) -> list[str]:
    """Delete checkpoint directories without ``COMPLETE``; returns their names."""
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and TAG.match(p.name) and not (p / COMPLETE).exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def estimate_bytes(n_params: int, bf16: bool) -> int:
    """About one checkpoint of a student with ``n_params`` parameters: the module's weights
    (bf16 or fp32), the fp32 master copy, Adam's two moments and the importance state (two
    fp32 EMAs per prunable weight). Measured: 24 bytes per parameter at fp32, ZeRO-2."""
    return n_params * ((2 if bf16 else 4) + 4 + 8 + 8)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def space_problem(root: Path, need: int) -> str | None:
    """Why ``root``'s file system cannot take a checkpoint of ``need`` bytes, or None."""
    probe = root if root.exists() else next(p for p in root.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free >= need:
        return None
    return f"{free / 2**20:.1f} MiB free on the file system of {root}, a checkpoint needs about {need / 2**20:.1f} MiB"


def _any(flag: bool) -> bool:
    """True on every rank when it is True on any rank (collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t)
    return bool(t.item())


def checksum(path: Path) -> int:
    """CRC-32 of a file, read in chunks (zlib's: about 1 GB/s on one core, see docs/faults.md)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _shared_out(names: list[str], fn) -> dict:
    """``{name: fn(name)}`` for every name, each rank computing every world-th one (collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: fn(name) for name in names[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _describe(directory: Path, name: str) -> dict:
    path = directory / name
    return {"bytes": path.stat().st_size, "crc32": checksum(path)}


def write_manifest(directory: Path) -> None:
    """Record every file's size and CRC-32 in MANIFEST.json (collective; rank 0 writes it)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, COMPLETE))
    files = _shared_out(names, lambda name: _describe(directory, name))
    if dist.get_rank() == 0:
        (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def _inside(name: object) -> bool:
    """Whether a manifest's file name can only name a file of its own checkpoint directory."""
    return isinstance(name, str) and name != "" and not any(s in name for s in ("/", "\\", "..", "\0"))


def _well_formed(files: object) -> bool:
    return isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("crc32"), int)
        for e in files.values())


def _damage(directory: Path, name: str, expected: dict) -> str | None:
    """Why file ``name`` does not match its manifest entry, or None."""
    path = directory / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path}: {size} bytes, the manifest says {expected['bytes']}"
    if checksum(path) != expected["crc32"]:
        return f"{path}: checksum mismatch"
    return None


def verify(directory: Path) -> str | None:
    """The first damaged file of a checkpoint, as one line, or None (collective: the ranks share the files)."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return None  # written before checkpoints had manifests
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest}: unreadable ({err})"
    if not _well_formed(files):
        return f"{manifest}: unreadable (not a table of file sizes and checksums)"
    if outside := sorted(repr(name) for name in files if not _inside(name)):
        return f"{manifest}: names {outside[0]}, not a file of this checkpoint"
    found = _shared_out(sorted(files), lambda name: _damage(directory, name, files[name]))
    return next((found[name] for name in sorted(found) if found[name]), None)


def _set_aside(directory: Path) -> Path:
    aside, n = directory.with_name(directory.name + ".damaged"), 1
    while aside.exists():
        n += 1
        aside = directory.with_name(f"{directory.name}.damaged-{n}")
    directory.rename(aside)
    return aside


def find_resumable(root: Path) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint whose files match their manifest (collective).

    Each damaged one met on the way is renamed aside by rank 0 (never deleted) and reported:
    returns (tag or None, one line per damaged checkpoint).
    """
    _, ignored = read_latest(root)
    reports = [ignored] if ignored else []
    while (tag := find_latest(root)) is not None:
        problem = verify(root / tag)
        if problem is None:
            return tag, reports
        aside = [str(_set_aside(root / tag)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(aside, src=0)  # also the barrier: every rank sees it gone
        previous = find_latest(root)
        reports.append(f"damaged checkpoint {problem}: renamed {root / tag} to {aside[0]}; "
                       f"falling back to {previous or 'the start (no earlier complete checkpoint)'}")
    return None, reports


def save(engine, root: Path, step: int, meta: dict, pruner_state: dict, importance_state: dict, rank: int,
         data_state: dict, need_bytes: int, keep: int = 2, protect: str | None = None) -> str:
    """Save a checkpoint collectively (every rank calls this); returns its tag.

    ``need_bytes``: the size expected for the first checkpoint (later ones are checked against
    the newest complete one: the student only shrinks). ``keep``: the complete checkpoints kept
    (older ones are deleted once this one is complete), never ``protect`` (the one the run
    resumed from).
    """
    tag = f"step{step:08d}"
    previous = find_latest(root)
    if rank == 0:
        remove_incomplete(root)
    if previous is not None:
        need_bytes = _size(root / previous)
    problem = space_problem(root, need_bytes)
    if _any(problem is not None):
        raise CheckpointError(f"cannot save {root / tag}: {problem or 'no space on another rank'}; "
                              f"free some space and resume (latest is {previous or 'none'})")
    private_dir(root)
    private_dir(root / tag)  # before DeepSpeed writes into it (after rank 0 removed incomplete ones)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    error = None
    try:  # our own files: a failure on one rank is agreed on below instead of hanging the others
        torch.save({"rng": rng_state(), "data": data_state, "importance": importance_state},
                   root / tag / f"rank{rank}.pt")
        if rank == 0:
            torch.save(pruner_state, root / tag / PRUNER)
            (root / tag / META).write_text(json.dumps(meta, indent=1))
        faults.point("save", step)
    except OSError as err:
        error = err
    if _any(error is not None):  # also the barrier: every rank's files are written
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, None if error is None else f"{error.strerror or error} on rank {rank}")
        if rank == 0:
            shutil.rmtree(root / tag, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(f"could not write {root / tag} ({next(r for r in reasons if r)}): removed it; "
                              f"latest is still {previous or 'none'}")
    write_manifest(root / tag)
    if rank == 0:
        _fsync(root / tag)  # the files are on disk before COMPLETE says so (a node may lose power)
        (root / tag / COMPLETE).write_text("")
        _fsync(root / tag)
        _write_atomic(root / LATEST, tag)
        for old in complete_tags(root)[:-keep]:
            if old != protect:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def read_meta(root: Path, tag: str) -> dict:
    return json.loads((root / tag / META).read_text())


def load_run_state(root: Path, tag: str, rank: int) -> tuple[dict, dict | None]:
    """(pruner state, this rank's {"rng", "data"}); None for a rank the checkpoint does not have
    (it was saved at a smaller world size: that rank keeps its own seeded RNG stream)."""
    rank_file = root / tag / f"rank{rank}.pt"
    return safe_load(root / tag / PRUNER), safe_load(rank_file) if rank_file.exists() else None


def importance_states(root: Path, tag: str):
    """Every saved rank's importance state (``Pruner.local_state_dict``), read one rank file at a
    time; a checkpoint from before per-rank state holds whole tensors in ``pruner.pt``."""
    files = sorted((root / tag).glob("rank*.pt"))
    for path in files:
        state = safe_load(path).get("importance")
        if state is None:
            legacy = safe_load(root / tag / PRUNER).get("state", {})
            yield {"state": {n: {k: t.reshape(-1) for k, t in st.items()} for n, st in legacy.items() if st},
                   "shapes": {n: tuple(next(iter(st.values())).shape) for n, st in legacy.items() if st},
                   "fragments": {n: (0, next(iter(st.values())).numel()) for n, st in legacy.items() if st}}
            return
        yield state


def world_free_state(directory: Path) -> tuple[dict, dict, int, dict]:
    """A ZeRO 1-3 checkpoint saved at any world size as full fp32 tensors, to resume at another.

    Returns (params, moments, adam_step, engine counters): ``params[name]`` and
    ``moments[name][exp_avg|exp_avg_sq]`` are full tensors (tied parameters under each of their
    names; buffers too), the counters are DeepSpeed's ``global_steps``, ``global_samples``,
    ``skipped_steps`` and the LR scheduler's state. Adam's moments sit in flat partitions laid
    out exactly like the fp32 master weights, so DeepSpeed's own ``zero_to_fp32`` reassembly of
    the weights reassembles them too. Every rank reads every shard (host memory: 12 bytes per
    parameter, as a shrink's gather). ``zero_to_fp32`` unpickles the model states itself: the
    caller has passed ``directory`` through :func:`check_loadable`.
    """
    from deepspeed.utils import zero_to_fp32 as z  # noqa: PLC0415

    model_states = z.parse_model_states(z.get_model_state_files(str(directory)))
    optim = [safe_load(Path(f), map_location="cpu")["optimizer_state_dict"]
             for f in z.get_optim_files(str(directory))]
    stage, world = int(optim[0]["zero_stage"]), len(optim)
    flat_key, inner = ("fp32_flat_groups", "optimizer_state_dict") if stage == 3 else \
        ("single_partition_of_fp32_groups", "base_optimizer_state")

    def reassemble(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if stage == 3:
            return z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False))
        return dict(z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False,
                                                                 optim[0].get("param_alignment_paddings")))

    params = reassemble([o[flat_key] for o in optim])
    states = [o[inner]["state"] for o in optim]
    by_moment = {k: reassemble([[st[i][k] for i in range(len(o[flat_key]))] for st, o in zip(states, optim)])
                 for k in ("exp_avg", "exp_avg_sq")}
    moments = {name: {k: by_moment[k][name] for k in by_moment} for name in params if name in by_moment["exp_avg"]}
    adam_step = int(next(iter(states[0].values()))["step"])
    engine_file = safe_load(Path(z.get_model_state_files(str(directory))[0]), map_location="cpu")
    counters = {k: engine_file[k] for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}
    return params, moments, adam_step, counters
