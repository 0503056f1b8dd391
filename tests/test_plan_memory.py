"""The plan's memory per rank against a measured world-size-2 run on CPU (issue 17, item 6).

A BERT-base-shaped random-init teacher (hidden 768, 6 layers, 12 heads, FFN 3072, BERT's
30,522-token vocabulary; 67.0M parameters) is distilled with PLATON pruning in fp32 for two
steps at ZeRO 2 and at ZeRO 3, on two ranks; micro-batch 2 × 32 tokens, so that weights,
gradients, optimizer and importance state dominate. Each rank's peak resident set above its
start-up baseline (tests/plan_memory_runs.py) must be within 20% of what ``homodistil plan``
models per GPU, without the fixed reserve for the CUDA context (a CPU run has none). Without the
optimizer and importance state the plan must miss the bound: the test can fail.
docs/profiling.md has the figures. Two launches: 2.3 min in all on the shared 2-core machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from homodistil.config import load_config
from homodistil.cost import GIB, make_plan

REPO = Path(__file__).resolve().parents[1]
BERT_BASE = ["model.tiny={hidden_size: 768, num_hidden_layers: 6, num_attention_heads: 12, intermediate_size: 3072}",
             "data.max_seq_length=32", "deepspeed.train_micro_batch_size_per_gpu=2", "trainer.max_steps=100",
             "pruning.t_f=100", "trainer.export=false", "trainer.eval_every=0", "trainer.progress=false"]
BOUND = 0.2


def overrides(out: Path, stage: int) -> list[str]:
    return BERT_BASE + [f"trainer.output_dir={out}", f"deepspeed.zero_optimization.stage={stage}"]


def measure(tmp_path: Path, specs: list[list[str]]) -> list[list[dict]]:
    """One torchrun launch at world size 2 of tests/plan_memory_runs.py: per rank, per run."""
    from homodistil.engine.dist import _free_port

    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "tests" / "plan_memory_runs.py"), str(tmp_path / "specs.json"), str(tmp_path / "mem")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"mem.rank{r}.json").read_text()) for r in range(2)]


def modelled(stage: int, out: Path) -> dict[str, float]:
    """The plan's parts per GPU at world size 2, less the CUDA reserve."""
    plan = make_plan(load_config(REPO / "configs" / "tiny.yaml", overrides(out, stage)), "h100-80gb", 1, 2)
    return {k: v for k, v in plan.memory.items() if not k.startswith("CUDA context")}


@pytest.mark.parametrize("stage", [2, 3])
def test_plan_memory_per_rank_is_within_20_percent_of_a_measured_run(tmp_path, stage):
    # one run per launch: a process keeps part of a finished run's engine alive, which would
    # double the host memory of a second run in the same process on a 24 GiB machine
    ranks = measure(tmp_path, [overrides(tmp_path / "run", stage)])
    parts = modelled(stage, tmp_path / "run")
    plan = sum(parts.values())
    for rank, (record,) in enumerate(ranks):
        peak = record["peak"]
        print(f"ZeRO {stage} rank {rank}: measured {peak / GIB:.2f} GiB, plan {plan / GIB:.2f} GiB "
              f"({plan / peak - 1:+.1%})")
        assert abs(plan - peak) <= BOUND * peak, (stage, rank, peak / GIB, plan / GIB)
        # the bound sees missing terms: without the optimizer and importance state the plan misses it
        # (each alone: -19% to -21% at ZeRO 2, -22% to -29% at ZeRO 3 when measured; docs/profiling.md)
        missing = parts["optimizer state"] + parts["importance state (PLATON)"]
        for term in ("optimizer state", "importance state (PLATON)"):
            print(f"  without {term}: {(plan - parts[term]) / peak - 1:+.1%}")
        assert abs(plan - missing - peak) > BOUND * peak
