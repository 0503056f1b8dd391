"""Atomic checkpoints: DeepSpeed's sharded model/optimizer files plus our run state.

Layout under ``<output_dir>/checkpoints/``::

    latest                      tag of the newest *complete* checkpoint (atomic rename)
    step00000040/               DeepSpeed files (model, optimizer, LR scheduler; per rank)
        meta.json               step, widths, teacher config, tokenizer: enough to rebuild
        pruner.pt               masks, scores, importance state (identical on all ranks)
        rank{r}.pt              each rank's RNG state (torch/python/numpy) and data position
        COMPLETE                written last, after every rank finished

An interrupted save (a killed process, a full disk) leaves a directory without ``COMPLETE``;
``latest`` still names the previous checkpoint, resuming ignores the partial one and the
next save or resume deletes it. Before writing, every rank checks that the file system has
room for one more checkpoint (the size of the newest one, or an estimate for the first), so a
full disk stops the run with one line instead of a half-written checkpoint; an ``OSError``
while writing our own files (ENOSPC, EIO) removes the partial checkpoint and stops the same way.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import faults
from .dist import device

LATEST, COMPLETE, META, PRUNER = "latest", "COMPLETE", "meta.json", "pruner.pt"
KEEP_LAST = 2  # complete checkpoints kept; older ones are deleted after a save


class CheckpointError(OSError):
    """A checkpoint cannot be written (no space, an I/O error): printed as one line."""


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


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / COMPLETE).exists())


def find_latest(root: Path) -> str | None:
    """The newest complete checkpoint's tag (``latest`` if it is complete, else the last complete one)."""
    latest = root / LATEST
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def remove_incomplete(root: Path) -> list[str]:
    """Delete checkpoint directories without ``COMPLETE``; returns their names."""
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not (p / COMPLETE).exists():
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


def save(engine, root: Path, step: int, meta: dict, pruner_state: dict, rank: int, data_state: dict,
         need_bytes: int) -> str:
    """Save a checkpoint collectively (every rank calls this); returns its tag.

    ``need_bytes``: the size expected for the first checkpoint (later ones are checked against
    the newest complete one: the student only shrinks).
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
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    error = None
    try:  # our own files: a failure on one rank is agreed on below instead of hanging the others
        torch.save({"rng": rng_state(), "data": data_state}, root / tag / f"rank{rank}.pt")
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
    if rank == 0:
        _fsync(root / tag)  # the files are on disk before COMPLETE says so (a node may lose power)
        (root / tag / COMPLETE).write_text("")
        _fsync(root / tag)
        _write_atomic(root / LATEST, tag)
        for old in complete_tags(root)[:-KEEP_LAST]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def read_meta(root: Path, tag: str) -> dict:
    return json.loads((root / tag / META).read_text())


def load_run_state(root: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """(pruner state, this rank's {"rng", "data"}); a rank missing from the checkpoint takes rank 0's."""
    rank_file = root / tag / f"rank{rank}.pt"
    if not rank_file.exists():
        rank_file = root / tag / "rank0.pt"
    return (torch.load(root / tag / PRUNER, weights_only=False),
            torch.load(rank_file, weights_only=False))
