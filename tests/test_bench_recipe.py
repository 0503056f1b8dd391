"""benchmarks/recipe.py's interleaved importance estimate: PLATON scores exactly the odd steps of the one run,
and the figure is the median of the (odd, next even) step-time ratios that the run logged."""
import importlib.util
import json
import statistics
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recipe", REPO / "benchmarks" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_importance_scores_the_odd_steps_and_pairs_them(tmp_path):
    bench = _bench()
    base = tiny_overrides(tmp_path, trainer__perf_every=1)  # (the benchmark's own overrides come later and win)
    ratio, pairs = bench.interleaved_importance(base, tmp_path, warmup=1, pairs=3)
    rows = [json.loads(line) for line in (tmp_path / "interleaved" / "metrics.jsonl").read_text().splitlines()]
    calls = {r["step"]: r.get("kernels/importance/calls", 0) for r in rows}
    assert sorted(calls) == list(range(1, 10))  # warm-up 1 -> 2 steps, 3 pairs, the last step
    assert all(calls[s] > 0 for s in (1, 3, 5, 7, 9)) and all(calls[s] == 0 for s in (2, 4, 6, 8)), calls
    seconds = {r["step"]: r["time/step_s"] for r in rows}
    assert pairs == [(seconds[s], seconds[s + 1]) for s in (3, 5, 7)]
    assert ratio == statistics.median(a / b for a, b in pairs)
