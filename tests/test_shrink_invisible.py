"""Shrinking is invisible: a run that shrinks after every mask update and one that shrinks once,
at t_f, keep the same units, log the same losses and end with the same weights; at every shrink
the masked and the shrunk student give the same outputs.

Widths are what the cubic schedule really produces on a short schedule (mask_interval 1-5,
sparsities drawn with a fixed seed), odd head counts make every hidden-sized tensor odd, and
the draws include a width of 1 (fewer units than ranks): ZeRO-3 at world size 2 then pads
every such tensor's partitions. BERT and Llama with grouped-query attention (3 query heads
per KV head), each metric, ZeRO 0-3 at world size 1 and 2. Several runs share one process
(shrink_runs.py): one torchrun launch per world-size-2 test.

Tolerances as in test_recipe.py: 1e-5 on losses, outputs and final weights; masks exactly.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch

from conftest import tiny_overrides
from recipe_runs import REPO
from shrink_runs import record

UNALIGNED = ["pruning.width_multiple.ffn=1", "pruning.width_multiple.hidden=1"]  # any width, odd ones included
FAMILIES = {  # 3 heads of width 10: every hidden-sized tensor has an odd size at an odd head width
    "bert": ["model.tiny.family=bert", "model.tiny.hidden_size=30", "model.tiny.num_attention_heads=3",
             "model.tiny.intermediate_size=40", *UNALIGNED],
    "llama": ["model.tiny.family=llama", "model.tiny.hidden_size=30", "model.tiny.num_attention_heads=3",
              "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=40", "pruning.sparsity.attention=0",
              *UNALIGNED],
}
ONCE = 1000  # shrink_interval past the run: the only shrink is at t_f


def _schedule(rng: random.Random, family: str, smallest: bool) -> list[str]:
    """A short cubic schedule; ``smallest`` prunes to 1 FFN unit and 1 hidden unit per head."""
    interval = rng.randint(1, 5)
    t_f = max(3, interval + rng.randint(1, 2))  # two or more mask updates
    ffn, hidden = (0.99, 0.95) if smallest else (round(rng.uniform(0.3, 0.9), 2), round(rng.uniform(0.2, 0.8), 2))
    sparsity = [f"pruning.sparsity.ffn={ffn}", f"pruning.sparsity.hidden={hidden}"]
    if family == "bert":
        sparsity.append(f"pruning.sparsity.attention={hidden}")  # BERT ties head width to hidden
    return [f"pruning.t_f={t_f}", f"trainer.max_steps={t_f + 1}", f"pruning.mask_interval={interval}",
            *sparsity]


def _pair(tmp_path, tag: str, family: str, schedule: list[str], extra: list[str]) -> list[list[str]]:
    """Overrides of the shrink-every-mask-update run and of the shrink-once run."""
    interval = next(int(o.split("=")[1]) for o in schedule if o.startswith("pruning.mask_interval="))
    return [tiny_overrides(tmp_path / f"{tag}-{how}", data__cache_dir=tmp_path / "cache") + FAMILIES[family]
            + schedule + extra + [f"pruning.shrink_interval={shrink}"]
            for how, shrink in (("every", interval), ("once", ONCE))]


def _torchrun(tmp_path, specs: list[list[str]]) -> list[dict]:
    """Record every run of ``specs`` in one world-size-2 torchrun launch."""
    from homodistil.engine.dist import _free_port

    (tmp_path / "specs.json").write_text(json.dumps([[str(o) for o in s] for s in specs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "tests" / "shrink_runs.py"), str(tmp_path / "specs.json"), str(tmp_path / "records.pt")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "records.pt", weights_only=False)


def _check_pair(every: dict, once: dict, what: str) -> dict[str, float]:
    """Same masks at every update, same losses, same final weights; outputs unchanged by each shrink.
    Returns the largest differences (for the failure messages of the callers)."""
    assert [s for s, _ in every["live"]] == [s for s, _ in once["live"]], what
    for (step, a), (_, b) in zip(every["live"], once["live"]):
        assert a == b, f"{what}: the masks differ at step {step}"
    assert len(every["shrinks"]) >= 1 and len(once["shrinks"]) == 1, (what, every["shrinks"], once["shrinks"])
    for step, kept, diff in every["shrinks"] + once["shrinks"]:
        assert diff < 1e-5, f"{what}: shrinking to {kept} at step {step} changed the outputs by {diff:.2e}"
    la, lb = torch.tensor(every["losses"]), torch.tensor(once["losses"])
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=0, msg=what)
    assert every["params"].keys() == once["params"].keys()
    for name, p in every["params"].items():
        torch.testing.assert_close(p, once["params"][name], atol=1e-5, rtol=0, msg=f"{what}: {name}")
    return {"loss": float((la - lb).abs().max()),
            "weight": max(float((p - once["params"][n]).abs().max()) for n, p in every["params"].items())}


def _widths(records: list[dict]) -> set[int]:
    return {k for r in records for _, kept, _ in r["shrinks"] for k in kept.values()}


def _check_across(runs: list[dict], what: str) -> None:
    """The same run under other engines: the same masks and losses as the first."""
    for run in runs[1:]:
        assert run["live"] == runs[0]["live"], what
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(runs[0]["losses"]), atol=1e-5, rtol=0,
                                   msg=what)


def test_zero3_world_size_2_every_metric(tmp_path):
    """ZeRO-3, world size 2: BERT and Llama-GQA, each metric, shrink every mask update vs once."""
    rng = random.Random(12)
    specs, names = [], []
    for i, (family, metric) in enumerate([(f, m) for f in FAMILIES for m in ("magnitude", "sensitivity", "platon")]):
        schedule = _schedule(rng, family, smallest=i in (0, 5))
        specs += _pair(tmp_path, f"{family}-{metric}", family, schedule,
                       ["deepspeed.zero_optimization.stage=3", f"pruning.metric={metric}"])
        names.append(f"{family} {metric} {schedule}")
    records = _torchrun(tmp_path, specs)
    for k, name in enumerate(names):
        _check_pair(records[2 * k], records[2 * k + 1], name)
    widths = _widths(records)
    assert max(len(r["shrinks"]) for r in records) > 1  # runs shrink more than once
    assert 1 in widths and any(w % 2 and w > 2 for w in widths), widths  # 1 unit, odd widths: padded partitions


def test_zero_stages_at_world_size_2(tmp_path):
    """ZeRO 0, 1 and 2 at world size 2 (their flat partitions cut the same widths elsewhere): the
    shrink-every run at each stage equals the shrink-once run (ZeRO-0) and the other stages."""
    schedule = _schedule(random.Random(3), "bert", smallest=False)
    specs = [_pair(tmp_path, f"z{stage}", "bert", schedule, [f"deepspeed.zero_optimization.stage={stage}"])
             for stage in (0, 1, 2)]
    once, *every = _torchrun(tmp_path, [specs[0][1]] + [every for every, _ in specs])
    for stage, run in enumerate(every):
        _check_pair(run, once, f"ZeRO-{stage} {schedule}")
    _check_across(every, f"ZeRO 0-2 {schedule}")
    assert max(len(r["shrinks"]) for r in every) > 1


def test_zero_stages_at_world_size_1(tmp_path):
    """ZeRO 0-3 at world size 1, Llama-GQA down to 1 unit, PLATON: shrink-every at each stage
    equals shrink-once (ZeRO-0) and the other stages."""
    schedule = _schedule(random.Random(0), "llama", smallest=True)
    specs = [_pair(tmp_path, f"z{stage}", "llama", schedule, [f"deepspeed.zero_optimization.stage={stage}"])
             for stage in (0, 1, 2, 3)]
    once, *every = (record(s) for s in [specs[0][1]] + [every for every, _ in specs])
    for stage, run in enumerate(every):
        _check_pair(run, once, f"ZeRO-{stage} {schedule}")
    _check_across(every, f"ZeRO 0-3 {schedule}")
    assert 1 in _widths(every)
