"""Profiling during training: perf/* scalars, the FLOP model shared with ``homodistil plan``,
the torch.profiler window and the report's plots (docs/profiling.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from homodistil.config import load_config
from homodistil.cost import (known_teacher, count_params, forward_flops_per_token, gpu_for_device, make_plan,
                             peak_tflops, step_flops_per_token, student_arch, teacher_arch)

from conftest import tiny_overrides
from recipe_runs import REPO, run_inprocess


def test_step_flops_by_hand_and_in_the_plan():
    """BERT-base, seq 128: student fwd+bwd (3x) with projections + teacher forward; the plan's total
    is this per-token figure times its tokens when nothing shrinks."""
    cfg = load_config(REPO / "configs" / "homobert_base.yaml",
                      ["pruning.sparsity.ffn=0", "pruning.sparsity.attention=0", "pruning.sparsity.hidden=0"])
    t = known_teacher("bert-base-uncased")
    matmul = count_params(t).matmul
    fwd = 2 * matmul + 4 * 12 * 128 * 768
    assert forward_flops_per_token(t, 128) == fwd
    proj = 13 * 768 * 768  # hidden-state projections, one per layer and the embeddings
    assert step_flops_per_token(cfg, t, t) == 3 * (fwd + 2 * proj) + fwd
    plan = make_plan(cfg, "a100-80gb", nodes=1)
    assert plan.flops == pytest.approx(plan.tokens * step_flops_per_token(cfg, t, t), rel=1e-12)
    mlm_only = load_config(REPO / "configs" / "homobert_base.yaml",
                           ["loss.alpha_pred=0", "loss.alpha_hidden=0", "loss.alpha_attention=0"])
    assert step_flops_per_token(mlm_only, t, t) == 3 * fwd  # no distillation term: the teacher never runs


def test_peak_table():
    assert gpu_for_device("NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert gpu_for_device("NVIDIA H200") == "h200"
    assert gpu_for_device("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert gpu_for_device("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert gpu_for_device("Tesla T4") is None
    assert peak_tflops("h100-80gb", bf16=True) == 989.0 and peak_tflops("a100-80gb", bf16=False) == 156.0


def test_cpu_peak_is_a_measured_rate():
    from homodistil.engine.perf import cpu_peak_tflops

    assert 1e-4 < cpu_peak_tflops() < 50  # a CPU's fp32 matmul rate, in TFLOP/s


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_profiled_run_writes_trace_and_perf_scalars(tmp_path):
    """A profiler window over steps 2-4 spans the shrinks at steps 2 and 4; TensorBoard holds the
    perf/* scalars, the phases cover the step time, and TFLOP/s follow the plan's FLOP model."""
    out = tmp_path / "run"
    peak = 0.5
    recipe = run_inprocess(tiny_overrides(out) + ["trainer.max_steps=6", "pruning.t_f=4", "pruning.shrink_interval=2",
                                                  "trainer.perf_every=1",
                                                  "trainer.profile={start: 2, steps: 3}", f"trainer.peak_tflops={peak}"])
    recipe.close()
    traces = list((out / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    for name in ("phase/student", "phase/teacher", "phase/shrink", "phase/importance", "phase/optimizer",
                 "kernel/masked_linear.forward", "kernel/importance"):
        assert name in names, name

    tb = _scalars(out)
    steps = range(1, 7)
    for key in ("perf/tokens_per_s", "perf/samples_per_s", "perf/tflops", "perf/mfu", "perf/step_s",
                "perf/phase/student", "perf/phase/shrink", "perf/base_mem_gib"):
        assert set(tb[key]) == set(steps), key
    # on CPU the resident set before any model was built (libraries only) is below the run's peak
    assert 0.1 < tb["perf/base_mem_gib"][6] < tb["perf/max_mem_gib"][6]
    phases = [k for k in tb if k.startswith("perf/phase/") and k != "perf/phase/other"]
    for step in steps:
        covered = sum(tb[k][step] for k in phases)
        assert covered == pytest.approx(tb["perf/step_s"][step], rel=0.10), step
        assert tb["perf/tokens_per_s"][step] == pytest.approx(4 * 32 / tb["perf/step_s"][step], rel=1e-5)
        assert tb["perf/mfu"][step] == pytest.approx(tb["perf/tflops"][step] / peak, rel=1e-5)
    assert tb["perf/phase/shrink"][2] > 0 and tb["perf/phase/shrink"][3] == 0
    assert tb["perf/phase/profile"][5] > 0  # writing the trace, after the window

    # metrics.jsonl has the same keys; at the final widths TFLOP/s follow the plan's FLOP model
    cfg = recipe.cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    t = teacher_arch(cfg)
    final = student_arch(cfg, {"ffn": 0.5, "attention": 0.5, "hidden": 0.5})
    last = rows[-1]
    assert last["prune/live_params"] == count_params(final).total  # the plan sees the same student
    per_token = last["perf/tflops"] * 1e12 * last["perf/step_s"] / (4 * 32)
    assert per_token == pytest.approx(step_flops_per_token(cfg, t, final), rel=1e-5)
    assert any("kernels/masked_linear.forward/calls" in r for r in rows)
    # one per scored tensor and step, and one more where PLATON folds (its S = Ī·U, only where the scores are read)
    folds = [r["step"] for r in rows if recipe.schedule.scores(r["step"]) and recipe.schedule.folds(r["step"])]
    assert folds == [1, 2, 3, 4]  # a mask update every step up to t_f = 4 (test_pruner: steps that do not fold)
    for r in rows:
        if recipe.schedule.scores(r["step"]):
            assert r["kernels/importance/calls"] == len(recipe.pruner.params) * (1 + (r["step"] in folds)), r["step"]

    # the report draws throughput and the phase breakdown from metrics.jsonl
    from homodistil.apps.report import write_report

    report = write_report(out).read_text()
    assert "![throughput](throughput.png)" in report and "![phases](phases.png)" in report
    assert (out / "throughput.png").stat().st_size > 10_000 and (out / "phases.png").stat().st_size > 10_000


def test_plan_from_run_uses_the_measured_mfu(tmp_path, capsys):
    from homodistil.apps.plan import plan_main

    rows = [{"step": s, "perf/mfu": m, "perf/peak_tflops": 989.0, "perf/max_mem_gib": g}
            for s, m, g in ((1, 0.05, 3.0), (2, 0.31, 7.5), (3, 0.30, 7.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(REPO / "configs" / "homobert_base.yaml"), "--gpu", "h100-80gb"]
    assert plan_main(args + ["--from-run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "at 30% MFU of 8 x 989 TFLOPS" in out  # the median, not the assumed 25%
    assert "MFU 30.0% (median of 3 steps" in out and "peak memory of rank 0 7.50 GiB (allocated)" in out
    # a CPU run also logs its resident set before any model was built: the plan shows the difference
    # beside its own total without the CUDA reserve
    from homodistil.cost import GIB, RESERVE_GIB

    rows = [{**r, "perf/base_mem_gib": 0.5} for r in rows]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plan_main(args + ["--from-run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    plan = make_plan(load_config(REPO / "configs" / "homobert_base.yaml"), "h100-80gb", 1)
    assert (f"peak memory of rank 0 7.50 GiB resident (CPU): 7.00 GiB above the 0.50 GiB before any model was "
            f"built, vs {plan.total_memory / GIB - RESERVE_GIB:.2f} GiB modelled without the CUDA reserve") in out
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/total": 1.0}) + "\n")
    assert plan_main(args + ["--from-run", str(tmp_path)]) == 2
    assert "has no perf/mfu" in capsys.readouterr().err
