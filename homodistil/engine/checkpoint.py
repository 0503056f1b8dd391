"""Atomic checkpoints: DeepSpeed's sharded model/optimizer files plus our run state.

Layout under ``<output_dir>/checkpoints/``::

    latest                      tag of the newest *complete* checkpoint (atomic rename)
    step00000040/               DeepSpeed files (model, optimizer, LR scheduler; per rank)
        meta.json               step, widths, teacher config, tokenizer: enough to rebuild
        pruner.pt               masks, scores, importance state (identical on all ranks)
        rank{r}.pt              each rank's RNG state (torch/python/numpy) and data position
        COMPLETE                written last, after every rank finished

An interrupted save leaves a directory without ``COMPLETE``; ``latest`` still names the
previous checkpoint, and the partial one is deleted on the next save or resume.
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

LATEST, COMPLETE, META, PRUNER = "latest", "COMPLETE", "meta.json", "pruner.pt"


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


def remove_incomplete(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and not (p / COMPLETE).exists():
                shutil.rmtree(p, ignore_errors=True)


def save(engine, root: Path, step: int, meta: dict, pruner_state: dict, rank: int, data_state: dict,
         keep_last: int = 2) -> str:
    """Save a checkpoint collectively (every rank calls this); returns its tag."""
    tag = f"step{step:08d}"
    if rank == 0:
        remove_incomplete(root)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"rng": rng_state(), "data": data_state}, root / tag / f"rank{rank}.pt")
    if rank == 0:
        torch.save(pruner_state, root / tag / PRUNER)
        (root / tag / META).write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if rank == 0:
        (root / tag / COMPLETE).write_text("")
        _write_atomic(root / LATEST, tag)
        for old in complete_tags(root)[:-keep_last]:
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
