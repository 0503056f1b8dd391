"""Peak host memory of short recipe runs, per rank (the driver of test_plan_memory.py).

Run as ``python tests/plan_memory_runs.py SPECS OUT`` under torchrun: for every run of ``SPECS``
(a JSON list of override lists for configs/tiny.yaml) in turn, in this one process, each rank
records the increase of its peak resident set (Linux ``VmHWM``) over a baseline taken with the
libraries imported and nothing built: what the run itself holds, which the plan models. Each run
trains ``STEPS`` steps of the dense regime (no mask update, no shrink; the plan's peak) and
saves nothing. Before each run the freed heap is returned to the system (``malloc_trim``) and
the peak is reset (``/proc/self/clear_refs``). Every rank writes ``OUT.rank<R>.json``: one
``{"base": ..., "setup": ..., "peak": ...}`` (bytes; setup and peak above base) per run.

Launch it with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc then maps every allocation of 1 MiB or
more on its own and unmaps it when freed, so the resident set follows what the tensors hold.
With glibc's default (a threshold that grows up to 32 MiB), freed weight-sized blocks stay in
the heap and identical runs differed by ~10% (3.8 vs 4.2 GB at ZeRO 2).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_runs import run_inprocess  # noqa: E402

LIBC = ctypes.CDLL("libc.so.6")
STEPS = 2


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def baseline() -> int:
    """Return freed memory to the system, reset the peak, and give the resident set now."""
    gc.collect()
    LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    return _status("VmRSS")


def measure(overrides: list[str]) -> dict[str, int]:
    base = baseline()
    recipe = run_inprocess(overrides, train=False)
    setup = _status("VmHWM")
    recipe.save = lambda: None  # the plan models training, not checkpoint writing
    log = recipe._log

    def log_and_stop(*args):  # a few steps of the dense regime, before any mask update or shrink
        log(*args)
        recipe.stop_requested = recipe.step >= STEPS

    recipe._log = log_and_stop
    try:
        recipe.train()
        peak = _status("VmHWM")
    finally:
        recipe.engine.destroy()
        recipe.close()
    del recipe
    return {"base": base, "setup": setup - base, "peak": peak - base}


def main(specs: str, out: str) -> None:
    import deepspeed  # noqa: F401  (imported before the baseline: libraries are not the run's memory)
    import homodistil.engine.recipe  # noqa: F401

    records = [measure(overrides) for overrides in json.loads(Path(specs).read_text())]
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main(*sys.argv[1:])
