"""One real distillation run on one GPU, measured: tokens/s before and after the first shrink,
the shrink's wall time, peak GPU memory against ``homodistil plan``'s figure for the same
config, every ``perf/*`` scalar the run logs, and a torch.profiler trace of a few steps.

    python benchmarks/gpu_run.py CONFIG [key=value ...] --out DIR [--profile-steps 3]

Writes ``DIR/result.json`` and ``DIR/result.md`` (and the run's own files under the
config's ``trainer.output_dir``; point it into DIR). The profiler is stepped from the
recipe's per-step log call and records ``--profile-steps`` steps after the first shrink's
neighbourhood is passed (steps 3.. by default, ``DIR/trace.json``, Chrome/Perfetto format).
Without a CUDA GPU it prints one line and exits 0 (``--allow-cpu`` runs anyway: the CPU
tests use it to check that the configs load and start).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

NO_GPU = "gpu_run: no CUDA GPU; this measures a real run on one and needs it"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distill")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--profile-steps", type=int, default=3, help="steps recorded by torch.profiler (0: none)")
    p.add_argument("--profile-from", type=int, default=3, help="first profiled step (default 3)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (config checks)")
    return p.parse_intermixed_args(argv)


def first_shrink_step(cfg) -> int:
    """The step whose end runs the first in-place shrink (recipe.train's rule)."""
    return min(cfg.pruning.shrink_interval, cfg.pruning.t_f)


def tokens_per_s(rows: list[dict], tokens_per_step: int, lo: int, hi: int) -> float | None:
    """Median tokens/s over the logged steps in [lo, hi] (None if none)."""
    times = [r["time/step_s"] for r in rows if lo <= r["step"] <= hi and "time/step_s" in r]
    return tokens_per_step / statistics.median(times) if times else None


def perf_means(rows: list[dict]) -> dict[str, float]:
    """Mean of every ``perf/*`` scalar the run logged (whatever issue 17's recipe writes)."""
    keys = sorted({k for r in rows for k in r if k.startswith("perf/")})
    return {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(NO_GPU)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    from homodistil.config import load_config
    from homodistil.engine import recipe as recipe_mod
    from homodistil.cost import make_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    gpu_key = "h200" if cuda and "H200" in torch.cuda.get_device_name() else "h100-80gb"
    plan = make_plan(cfg, gpu_key, nodes=1, gpus_per_node=1)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.data.max_seq_length

    # The profiler and the shrink timer hook the recipe's per-step log call and its shrink:
    # the recipe has no callbacks, and this script must not change what it runs.
    shrinks: list[tuple[int, float]] = []
    prof = None
    if args.profile_steps and cuda:
        from torch.profiler import ProfilerActivity, profile, schedule

        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=max(args.profile_from - 1, 0), warmup=1,
                                         active=args.profile_steps, repeat=1),
                       on_trace_ready=lambda p: p.export_chrome_trace(str(out / "trace.json")))
    log, shrink = recipe_mod.Recipe._log, recipe_mod.Recipe._shrink

    def timed_shrink(self):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        shrink(self)
        if cuda:
            torch.cuda.synchronize()
        shrinks.append((self.step, time.perf_counter() - started))

    def stepped_log(self, *a, **kw):
        log(self, *a, **kw)
        if prof is not None:
            prof.step()

    recipe_mod.Recipe._log, recipe_mod.Recipe._shrink = stepped_log, timed_shrink
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        if prof is not None:
            prof.start()
        run = recipe_mod.distill(cfg)
    finally:
        if prof is not None:
            prof.stop()
        recipe_mod.Recipe._log, recipe_mod.Recipe._shrink = log, shrink
    wall = time.perf_counter() - started

    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = first_shrink_step(cfg)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "config": args.config, "overrides": args.overrides,
        "steps": cfg.trainer.max_steps, "tokens_per_step": tokens_per_step, "wall_s": wall,
        "first_shrink_step": first,
        # steps 1-2 hold CUDA/cuBLAS warm-up; the shrink step's time includes the shrink
        "tokens_per_s_before_shrink": tokens_per_s(rows, tokens_per_step, 3, first - 1),
        "tokens_per_s_after_shrink": tokens_per_s(rows, tokens_per_step, first + 2, cfg.trainer.max_steps),
        "shrinks_s": shrinks,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "plan_gpu": gpu_key, "plan_total_gib": plan.total_memory / 2**30,
        "perf": perf_means(rows),
        "trace": str(out / "trace.json") if prof is not None else None,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"- device: {result['device']}; {args.config} {' '.join(args.overrides)}",
             f"- {cfg.trainer.max_steps} steps x {tokens_per_step} tokens in {wall:.1f} s (set-up included)"]
    for key in ("tokens_per_s_before_shrink", "tokens_per_s_after_shrink"):
        value = result[key]
        lines.append(f"- {key.replace('_', ' ')}: {'n/a' if value is None else f'{value:,.0f}'}")
    lines.append("- shrinks (step: wall s): " + (", ".join(f"{s}: {t:.2f}" for s, t in shrinks) or "none"))
    if cuda:
        lines.append(f"- peak GPU memory: allocated {result['peak_allocated_gib']:.2f} GiB, reserved "
                     f"{result['peak_reserved_gib']:.2f} GiB; `homodistil plan --gpu {gpu_key} --nodes 1 "
                     f"--gpus-per-node 1`: {result['plan_total_gib']:.2f} GiB")
    lines += [f"- {k} (mean): {v:.4g}" for k, v in result["perf"].items()] or ["- no perf/* scalars logged"]
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
