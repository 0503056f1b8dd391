"""One real distillation run on one GPU, measured: steady-state tokens/s and MFU at each width the
schedule trains at (before the first shrink, between shrinks, after the last), those widths, each
shrink's wall time, peak GPU memory against ``homodistil plan``'s figure for the same
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


def segments(cfg, rows: list[dict], peak_tflops: float | None) -> list[dict]:
    """Steady-state throughput at each width of the run: one entry per segment of the run's schedule
    (``PruningSchedule.segments``: the steps between shrinks and the widths trained there). Tokens/s is
    the segment's tokens over the summed ``time/step_s`` of its steady steps (a sum over many steps, so
    the asynchronous steps between host syncs add up to the wall time), MFU that times the cost model's
    FLOPs per token at the segment's widths (``step_flops_per_token``, the FLOP model of ``homodistil
    plan`` and ``perf/mfu``) over the device's peak."""
    from homodistil.cost import run_schedule, step_flops_per_token, teacher_arch

    schedule, arch = run_schedule(cfg)
    teacher = teacher_arch(cfg)
    tokens_per_step = cfg.global_batch(1) * cfg.data.max_seq_length
    step_s = {r["step"]: r["time/step_s"] for r in rows if "time/step_s" in r}
    out = []
    for start, end, kept in schedule.segments():
        # a segment's first two steps hold warm-up (CUDA/cuBLAS at steps 1-2, new shapes after a shrink);
        # the step that ends a segment also runs its shrink
        lo, hi = start + 3, end if end == cfg.trainer.max_steps else end - 1
        times = [step_s[s] for s in range(lo, hi + 1) if s in step_s]
        student = arch(kept)
        flops = step_flops_per_token(cfg, teacher, student)
        tps = tokens_per_step * len(times) / sum(times) if times else None
        out.append({"steps": [start + 1, end], "measured": [lo, hi] if times else None,
                    "hidden": student.hidden_size, "ffn": student.intermediate_size,
                    "aligned": student.intermediate_size % 64 == 0 and student.hidden_size % 8 == 0,
                    "gflop_per_token": flops / 1e9, "tokens_per_s": tps,
                    "mfu": tps * flops / (peak_tflops * 1e12) if tps and peak_tflops else None})
    return out


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
    from homodistil.cost import gpu_for_device, make_plan, peak_tflops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    gpu_key = (gpu_for_device(torch.cuda.get_device_name()) if cuda else None) or "h100-80gb"
    plan = make_plan(cfg, gpu_key, nodes=1, gpus_per_node=1)
    tokens_per_step = cfg.global_batch(1) * cfg.data.max_seq_length

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
    widths = segments(cfg, rows, peak_tflops(gpu_key, cfg.bf16) if cuda else None)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "config": args.config, "overrides": args.overrides,
        "steps": cfg.trainer.max_steps, "tokens_per_step": tokens_per_step, "wall_s": wall,
        "segments": widths,
        "mfu_before_shrink": widths[0]["mfu"], "mfu_after_shrink": widths[-1]["mfu"],
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
    lines.append("- steady state per width (goal on an H100/H200 at the Llama-1B shape: MFU >= 35% before the "
                 "shrink, >= 30% after; docs/gpu.md):")
    for seg in widths:
        tps, mfu = seg["tokens_per_s"], seg["mfu"]
        lines.append(f"  - steps {seg['steps'][0]}-{seg['steps'][1]} (measured {seg['measured']}): hidden "
                     f"{seg['hidden']}, FFN {seg['ffn']}{'' if seg['aligned'] else ' (NOT aligned to 8 / 64)'}, "
                     f"{seg['gflop_per_token']:.2f} GFLOP/token: "
                     f"{'n/a' if tps is None else f'{tps:,.0f} tokens/s'}"
                     f"{'' if mfu is None else f', MFU {100 * mfu:.1f}%'}")
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
