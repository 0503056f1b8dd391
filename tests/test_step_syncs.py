"""A training step waits for the device only at log steps (and mask, shrink and checkpoint steps).

On a GPU every read of a device tensor from the host (``.item()``, ``float()``, ``bool()``, ``.cpu()``,
``.tolist()``, ``nonzero()``, a boolean-mask index) stalls the host until the device has caught up,
so the next step's kernels are not queued in time. On the CPU the same calls are made, only
cheaply: this test patches them and fails if the recipe's own code (``homodistil/``) makes any
during a step that is neither a log, a mask, a shrink nor a checkpoint step. Two places are
host-only by construction and not counted: the data pipeline (``homodistil/data/``: it builds host
tensors, the scored positions included, before anything moves to the device) and the optimizer's
overflow verdict (``engine/numerics.py``, one per step at ZeRO-0; DeepSpeed's ZeRO 1-3 optimizers
take the same verdict themselves). ZeRO 0, 2 and 3.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from recipe_runs import run_inprocess

PACKAGE = str(Path(__file__).resolve().parents[1] / "homodistil")
HOST_ONLY = (str(Path(PACKAGE) / "data"), str(Path(PACKAGE) / "engine" / "numerics.py"))
READS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__", "nonzero")


def _ours(filename: str) -> bool:
    return filename.startswith(PACKAGE) and not filename.startswith(HOST_ONLY)


@pytest.fixture
def syncs(monkeypatch):
    """Patches the host reads of torch.Tensor; returns the list that collects (step, where, what)."""
    found: list[tuple[int, str, str]] = []
    current = {"step": 0}

    def record(what: str) -> None:
        caller = sys._getframe(2)
        if _ours(caller.f_code.co_filename):
            found.append((current["step"], f"{caller.f_code.co_filename}:{caller.f_lineno}", what))

    def patch(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            record(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in READS:
        patch(name)
    getitem = torch.Tensor.__getitem__

    def indexed(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            record("boolean-mask index")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)
    return found, current


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_no_host_sync_between_log_and_mask_steps(tmp_path, tiny, syncs, stage):
    found, current = syncs
    # masks at step 4 (t_i) and 8, shrinks at 8, logs every 3 steps, a checkpoint at the end (9)
    recipe = run_inprocess(tiny(tmp_path / "run") + [
        "trainer.max_steps=9", "trainer.log_every=3", "trainer.save_every=0", "trainer.eval_every=0",
        "pruning.t_i=4", "pruning.t_f=8", "pruning.mask_interval=4", "pruning.shrink_interval=8",
        f"deepspeed.zero_optimization.stage={stage}"], train=False)
    begin = recipe.perf.begin_step

    def begin_step(step: int) -> None:
        current["step"] = step
        begin(step)

    recipe.perf.begin_step = begin_step
    found.clear()  # set-up reads as it likes
    recipe.train()
    recipe.close()
    quiet = {1, 2, 5, 7}  # neither log (3, 6, 9), mask (4, 8), shrink (8) nor checkpoint (9) steps
    assert {step for step, _, _ in found} - quiet, "no sync recorded at all: the patches did not take"
    offending = [(step, where, what) for step, where, what in found if step in quiet]
    assert not offending, "host syncs inside training steps:\n" + "\n".join(map(str, offending))
