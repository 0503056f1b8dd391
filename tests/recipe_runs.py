"""Run the recipe in this process (world size 1) or under torchrun (world size 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from homodistil.config import load_config

REPO = Path(__file__).resolve().parents[1]


def run_inprocess(overrides: list[str], train: bool = True):
    from homodistil.engine.recipe import Recipe

    recipe = Recipe(load_config(REPO / "configs" / "tiny.yaml", overrides)).setup()
    if train:
        recipe.train()
    return recipe


def run_torchrun(overrides: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from homodistil.engine.dist import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "homodistil.cli", "distill", str(REPO / "configs" / "tiny.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, _last_step(overrides) + proc.stderr[-4000:]
    return proc


def _last_step(overrides: list[str]) -> str:
    """Where a failed run got to: a crash after its last step is not one inside training."""
    out = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("trainer.output_dir=")), None)
    if out is None or not (out / "metrics.jsonl").exists():
        return "no step logged\n"
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return f"last step logged: {json.loads(rows[-1])['step'] if rows else None}\n"


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows]


def run_specs(record, specs: str, out: str) -> None:
    """A torchrun driver's body: ``record(overrides)`` for every run of the JSON list ``specs``, in
    order on every rank (the runs are collective); rank 0 saves the records to ``out``."""
    import torch

    records = [record(overrides) for overrides in json.loads(Path(specs).read_text())]
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(records, out)
