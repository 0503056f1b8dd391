"""Recipe costs measured side by side in one run, printed as ratios.

    python benchmarks/recipe.py                 # MiniLM-shaped BERT (6×384, FFN 1536), seq 128
    python benchmarks/recipe.py --hidden 768 --layers 12 --heads 12 --ffn 3072   # BERT-base shape
    python benchmarks/recipe.py --family llama --hidden 1024 --ffn 4096 --layers 4 --importance-only

Reports, on the machine it runs on:
1. a distill step (teacher forward, all four losses, importance) vs a plain MLM step of the
   same student (goal ≤ 1.4×);
2. the step time of students shrunk to 50% and 25% width vs full width, beside the ratio of
   their live parameters (goal: within 20% of it);
3. the cost of one shrink (gather + rebuild + restore) in training steps;
5. the peak extra host memory of a shrink per rank against the student's fp32 size, at world size
   1 and 2 (torchrun, ZeRO-3, 1 MiB glibc mmap threshold so that freed tensors leave the resident
   set): streaming the state, and the whole shrink with DeepSpeed's rebuild;
4. the cost of the perf/* and kernels/* scalars: configs/tiny.yaml as it is, trained with
   ``trainer.perf_every=1`` vs ``0`` (goal: within 2%), ``--perf-cost-only`` runs just this;
5. a distill step with PLATON importance vs one without importance (goal ≤ 1.05), two ways:
   interleaved in one run (PLATON scores the odd steps only, so each step with importance has a
   step without it beside it: the median of those pairs' ratios; the machine's drift over minutes,
   up to 25% between runs on a shared 2-core VM, cancels), and as alternating whole runs
   (``--importance-pairs``, the median of their ratios; drift included). ``--importance-only`` runs
   just this, ends with the line ``importance overhead: R`` (R: the interleaved figure), and under
   ``torchrun --nproc_per_node 2`` measures it at world size 2 (rank 0 prints). PLATON forms its
   scores only where a mask update reads them: in both runs that is the last step, which is not timed.
6. the CPU step with glibc keeping freed blocks (``trainer.keep_freed_memory``, the default) vs glibc's own
   handling (every block above 32 MiB mapped afresh and page-faulted in every step): alternating whole
   runs in fresh processes (the setting is process-wide), the median ratio of their median steps, with
   each run's page faults, system CPU time and peak resident set (``wait4``); ``--host-memory-only`` runs
   just this.
``--family llama`` times a tiny Llama teacher of the given shape instead of BERT (grouped-query
attention with ``--kv-heads``, default a quarter of the heads, which default to hidden / 64;
attention is not pruned in the Llama family, so its sparsity is 0).
Timings 1-3 are medians over the steps after a warm-up, from the recipe's own ``time/step_s``;
4 compares the wall time of whole ``train()`` calls, alternating the two, median of the pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], out: Path, measure_shrink: bool = False):
    from homodistil.config import load_config
    from homodistil.engine.recipe import Recipe

    recipe = Recipe(load_config(REPO / "configs" / "tiny.yaml", overrides + [f"trainer.output_dir={out}"])).setup()
    shrink_times = []
    if measure_shrink:
        shrink = recipe._shrink

        def timed():
            started = time.perf_counter()
            shrink()
            shrink_times.append(time.perf_counter() - started)

        recipe._shrink = timed
    recipe.train()
    recipe.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, shrink_times, recipe


def shrink_memory(base: list[str], nproc: int, out: Path) -> tuple[float, list[float], list[float]]:
    """(student fp32 bytes, per-rank streaming peaks, per-rank whole-shrink peaks) of one shrink at step 2."""
    import re
    import subprocess

    from homodistil.engine.dist import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), "-m", "homodistil.cli", "distill", str(REPO / "configs" / "tiny.yaml"), *base,
           "pruning.sparsity.ffn=0.5", "pruning.sparsity.attention=0.5", "pruning.sparsity.hidden=0.5", "pruning.t_i=0",
           "pruning.t_f=2", "pruning.mask_interval=1", "pruning.shrink_interval=2", "trainer.max_steps=2",
           "trainer.eval_every=0", "deepspeed.zero_optimization.stage=3", f"trainer.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO).stdout
    full = float(re.search(r"\(([\d.]+)M student parameters", text).group(1)) * 1e6 * 4
    found = re.search(r"streaming the state ([\d., ]+), whole shrink ([\d., ]+)", text)
    mib = [[float(v) * 2**20 for v in found.group(i).split(", ")] for i in (1, 2)]
    return full, mib[0], mib[1]


def perf_cost(tmp: Path, steps: int, pairs: int) -> tuple[float, list[float]]:
    """Median over ``pairs`` of (train() with perf scalars) / (train() without), tiny config."""
    from homodistil.config import load_config
    from homodistil.engine.recipe import Recipe

    def train_seconds(every: int, out: Path) -> float:
        overrides = [f"trainer.max_steps={steps}", f"pruning.t_f={steps * 4 // 5}", "trainer.save_every=0",
                     "trainer.export=false", "trainer.progress=false", "trainer.log_every=100000",
                     f"trainer.perf_every={every}", f"trainer.output_dir={out}"]
        recipe = Recipe(load_config(REPO / "configs" / "tiny.yaml", overrides)).setup()
        started = time.perf_counter()
        recipe.train()
        seconds = time.perf_counter() - started
        recipe.close()
        return seconds

    ratios = []
    for k in range(pairs):
        with_perf, without = train_seconds(1, tmp / f"perf{k}"), train_seconds(0, tmp / f"noperf{k}")
        ratios.append(with_perf / without)
    return statistics.median(ratios), ratios


def host_memory_cost(base: list[str], tmp: Path, warmup: int, pairs: int) -> tuple[float, list[dict]]:
    """Median over ``pairs`` of (median step, freed blocks kept) / (median step, glibc's defaults), each run a
    fresh ``homodistil distill`` process of ``base`` (the steps after ``warmup`` but the last, which masks and
    shrinks); and every run's figures (step s, minor faults, system s, peak RSS)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = []
    for k in range(pairs):
        for keep in (True, False):
            out = tmp / f"host{k}{keep}"
            cmd = [sys.executable, "-m", "homodistil.cli", "distill", str(REPO / "configs" / "tiny.yaml"), *base,
                   f"trainer.keep_freed_memory={str(keep).lower()}", f"data.cache_dir={tmp / 'cache'}",
                   f"trainer.output_dir={out}"]
            child = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
            stderr = child.stderr.read()
            _, status, usage = os.wait4(child.pid, 0)
            if status:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            runs.append({"keep": keep, "step_s": statistics.median(r["time/step_s"] for r in rows[warmup:-1]),
                         "faults": usage.ru_minflt, "sys_s": usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024})
    ratios = [a["step_s"] / b["step_s"] for a, b in zip(runs[::2], runs[1::2])]
    return statistics.median(ratios), runs


def _scored_overrides(total: int) -> list[str]:
    """PLATON scored on every step of a ``total``-step run, its one mask update (and fold) at the last step."""
    return ["pruning.metric=platon", f"pruning.t_i={total - 1}", f"pruning.t_f={total}",
            f"pruning.mask_interval={total}", "pruning.shrink_interval=100000"]


def importance_cost(base: list[str], tmp: Path, warmup: int, total: int, pairs: int) -> tuple[float, list]:
    """Median over ``pairs`` of (distill step with PLATON every step) / (distill step without importance),
    each the median ``time/step_s`` of the steps after ``warmup`` but the last; the two runs alternate (a
    shared machine slows both alike, if it stays as loaded from one run to the next)."""
    with_imp = base + _scored_overrides(total)
    without = base + ["pruning.sparsity.ffn=0", "pruning.sparsity.attention=0", "pruning.sparsity.hidden=0",
                      "pruning.t_i=0", f"pruning.t_f={total}"]
    pairs_s = []
    for k in range(pairs):
        a, _, _ = run(with_imp + [f"data.cache_dir={tmp / 'cache'}"], tmp / f"imp{k}")
        b, _, _ = run(without + [f"data.cache_dir={tmp / 'cache'}"], tmp / f"noimp{k}")
        pairs_s.append((statistics.median(r["time/step_s"] for r in a[warmup:-1]),
                        statistics.median(r["time/step_s"] for r in b[warmup:-1])))
    return statistics.median(x / y for x, y in pairs_s), pairs_s


class OddSteps:
    """A run's schedule that scores only its odd steps (everything else as it was)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __getattr__(self, name):
        return getattr(self.schedule, name)

    def scores(self, step: int) -> bool:
        return step % 2 == 1 and self.schedule.scores(step)


def interleaved_importance(base: list[str], tmp: Path, warmup: int, pairs: int) -> tuple[float, list]:
    """One run of ``warmup`` + 2·``pairs`` + 1 steps, PLATON scored on the odd steps only: the median over the
    timed (odd, even) step pairs of (step with importance) / (the next step, without), and those pairs (s).
    Neighbouring steps see the same machine, so drift over minutes cancels; the last step (the mask update and
    PLATON's one fold) is not timed."""
    from homodistil.config import load_config
    from homodistil.engine.recipe import Recipe

    warmup += warmup % 2  # the timed pairs start on an odd step
    total = warmup + 2 * pairs + 1
    overrides = [*base, *_scored_overrides(total), f"trainer.max_steps={total}", f"data.cache_dir={tmp / 'cache'}",
                 f"trainer.output_dir={tmp / 'interleaved'}"]
    recipe = Recipe(load_config(REPO / "configs" / "tiny.yaml", overrides)).setup()
    recipe.schedule = OddSteps(recipe.schedule)
    recipe.train()
    recipe.close()
    rows = [json.loads(line) for line in (tmp / "interleaved" / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["time/step_s"] for r in rows}
    timed = [(seconds[s], seconds[s + 1]) for s in range(warmup + 1, total - 1, 2)]
    return statistics.median(a / b for a, b in timed), timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("bert", "llama"), default="bert", help="the tiny teacher's architecture")
    ap.add_argument("--kv-heads", type=int, default=None, help="llama: KV heads (default: heads / 4)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: 12 for bert, hidden / 64 "
                    "for llama)")
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--perf-steps", type=int, default=100, help="steps of each tiny run for the perf cost")
    ap.add_argument("--perf-pairs", type=int, default=3, help="alternating with/without pairs for the perf cost")
    ap.add_argument("--perf-cost-only", action="store_true", help="measure only the cost of the perf scalars")
    ap.add_argument("--importance-only", action="store_true",
                    help="measure only distill with PLATON every step / without importance (any world size)")
    ap.add_argument("--host-memory-only", action="store_true",
                    help="measure only the step with freed blocks kept / with glibc's defaults (CPU)")
    ap.add_argument("--host-memory-pairs", type=int, default=2, help="alternating kept/default run pairs")
    ap.add_argument("--importance-pairs", type=int, default=1, help="alternating with/without importance runs "
                    "(0: only the interleaved run)")
    ap.add_argument("--interleaved-pairs", type=int, default=8, help="timed (with, without) step pairs of the "
                    "interleaved importance run")
    args = ap.parse_args()
    if args.perf_cost_only:
        with tempfile.TemporaryDirectory() as tmp:
            ratio, ratios = perf_cost(Path(tmp), args.perf_steps, args.perf_pairs)
        print(f"{'perf scalars on / off (tiny config, train() wall time)':62s} {ratio:8.3f} {'<= 1.02':>14s}"
              f"   (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
        return 0

    total = args.warmup + args.steps + 2
    if args.heads is None:
        args.heads = 12 if args.family == "bert" else max(1, args.hidden // 64)
    base = [f"model.tiny.hidden_size={args.hidden}", f"model.tiny.num_hidden_layers={args.layers}",
            f"model.tiny.num_attention_heads={args.heads}", f"model.tiny.intermediate_size={args.ffn}",
            "model.dropout=0.0", "data.max_documents=400", f"data.max_seq_length={args.seq}",
            f"deepspeed.train_micro_batch_size_per_gpu={args.batch}", "trainer.progress=false",
            "trainer.export=false", "trainer.log_every=100000", f"trainer.max_steps={total}", "trainer.save_every=0"]
    if args.family == "llama":
        kv = args.kv_heads or max(1, args.heads // 4)
        base = [f"model.tiny.family={args.family}", f"model.tiny.num_key_value_heads={kv}",
                "pruning.sparsity.attention=0", *base]
    no_pruning = ["pruning.sparsity.ffn=0", "pruning.sparsity.attention=0", "pruning.sparsity.hidden=0",
                  f"pruning.t_f={total}"]  # nothing to prune: no importance, no masks

    def shrunk_to(s: float) -> list[str]:  # pruned to sparsity s at step 2, then timed at that width
        return [f"pruning.sparsity.ffn={s}", f"pruning.sparsity.attention={s}", f"pruning.sparsity.hidden={s}",
                "pruning.t_i=0", "pruning.t_f=2", "pruning.mask_interval=1", "pruning.shrink_interval=2"]

    def median_step(rows, first):
        return statistics.median(r["time/step_s"] for r in rows[first:])

    if args.host_memory_only:
        with tempfile.TemporaryDirectory() as tmp:
            ratio, runs = host_memory_cost(base + _scored_overrides(total), Path(tmp), args.warmup, args.host_memory_pairs)
        print(f"\nshape: {args.family}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn}; "
              f"batch {args.batch} x {args.seq} tokens; world size 1")
        for r in runs:
            print(f"  freed blocks {'kept      ' if r['keep'] else 'glibc own '}: median step {r['step_s']:.2f} s, "
                  f"{r['faults'] / 1e6:.2f}M page faults, system CPU {r['sys_s']:.0f} s, peak RSS {r['peak_mib']:.0f} MiB")
        print(f"{'distill step, freed blocks kept / glibc defaults (CPU)':62s} {ratio:8.3f}")
        return 0

    if args.importance_only:
        import torch.distributed as dist

        from homodistil.engine.dist import init_distributed

        rank, world, _ = init_distributed()
        out = Path(tempfile.mkdtemp(prefix="bench-importance-")) if rank == 0 else None
        shared = [str(out)]
        dist.broadcast_object_list(shared, src=0)
        tmp = Path(shared[0])  # (a later key=value wins: the interleaved run sets its own max_steps)
        ratio, steps = interleaved_importance(base, tmp, args.warmup, args.interleaved_pairs)
        runs = importance_cost(base, tmp, args.warmup, total, args.importance_pairs) if args.importance_pairs else None
        if rank == 0:
            print(f"\nshape: {args.family}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn}; "
                  f"batch {args.batch} x {args.seq} tokens per rank; world size {world}")
            print(f"{'step with PLATON / next step without, one interleaved run':62s} {ratio:8.3f} {'<= 1.05':>14s}"
                  f"   (seconds: {', '.join(f'{a:.2f}/{b:.2f}' for a, b in steps)})")
            if runs:
                print(f"{'distill step, PLATON every step / without, alternating runs':62s} {runs[0]:8.3f} "
                      f"{'(drift incl.)':>14s}   (seconds: {', '.join(f'{a:.3f}/{b:.3f}' for a, b in runs[1])})")
            print(f"importance overhead: {ratio:.3f}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        distill, _, _ = run(base + no_pruning + ["pruning.metric=platon"], tmp / "distill")
        # importance accumulates every step; the one mask update and shrink come at the last step
        distill_imp, _, _ = run(base + [f"pruning.t_i={total - 1}", f"pruning.t_f={total}",
                                        f"pruning.mask_interval={total}", "pruning.shrink_interval=100000"],
                                tmp / "distill_imp")
        mlm, _, _ = run(base + no_pruning + ["loss.alpha_pred=0", "loss.alpha_hidden=0", "loss.alpha_attention=0"],
                        tmp / "mlm")
        mlm_only = ["loss.alpha_pred=0", "loss.alpha_hidden=0", "loss.alpha_attention=0"]
        widths = {}
        for s in (0.5, 0.75):
            rows, shrinks, _ = run(base + shrunk_to(s), tmp / f"s{s}", measure_shrink=True)
            mlm_rows, _, _ = run(base + shrunk_to(s) + mlm_only, tmp / f"mlm{s}")
            widths[s] = (median_step(rows, args.warmup + 2), median_step(mlm_rows, args.warmup + 2),
                         rows[-1]["prune/live_params"], shrinks)
        full_params = distill[-1]["prune/live_params"]
        perf_ratio, perf_ratios = perf_cost(tmp, args.perf_steps, args.perf_pairs)
        memory = {n: shrink_memory(base[:-2], n, tmp / f"mem{n}") for n in (1, 2)}  # without max_steps, save_every

    t_distill = median_step(distill_imp, args.warmup)
    t_distill_noimp = median_step(distill, args.warmup)
    t_mlm = median_step(mlm, args.warmup)
    print(f"\nshape: {args.family}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn}; "
          f"batch {args.batch} x {args.seq} tokens; torch threads {__import__('torch').get_num_threads()}")
    print(f"{'measure':62s} {'value':>8s} {'goal':>14s}")
    print(f"{'distill step (with importance) / plain MLM step':62s} {t_distill / t_mlm:8.2f} {'<= 1.40':>14s}")
    print(f"{'distill step (no importance) / plain MLM step':62s} {t_distill_noimp / t_mlm:8.2f}")
    print(f"{'distill step, PLATON every step / without importance':62s} {t_distill / t_distill_noimp:8.3f} "
          f"{'<= 1.05':>14s}")
    print(f"  seconds: distill {t_distill:.3f}, distill w/o importance {t_distill_noimp:.3f}, MLM {t_mlm:.3f}")
    for s, (t, t_plain, live, shrinks) in widths.items():
        pct, ratio = int(round(100 * (1 - s))), live / full_params
        print(f"{f'{pct}% width: live parameters / full width':62s} {ratio:8.2f}")
        print(f"{f'{pct}% width: student MLM step / full width':62s} {t_plain / t_mlm:8.2f} "
              f"{f'{0.8 * ratio:.2f}-{1.2 * ratio:.2f}':>14s}")
        print(f"{f'{pct}% width: distill step (full-size teacher) / full width':62s} {t / t_distill_noimp:8.2f}")
        print(f"{f'{pct}% width: one shrink / one full-width distill step':62s} "
              f"{shrinks[0] / t_distill_noimp:8.2f}   ({shrinks[0]:.2f}s)")
    for n, (full, streamed, whole) in memory.items():
        print(f"{f'shrink, world size {n}: peak extra host memory per rank / student fp32':62s} "
              f"{max(streamed) / full:8.2f}   (streaming the state: {', '.join(f'{b / full:.2f}' for b in streamed)}; "
              f"whole shrink: {', '.join(f'{b / full:.2f}' for b in whole)}; fp32 size {full / 2**20:.0f} MiB)")
    print(f"{'perf scalars on / off (tiny config, train() wall time)':62s} {perf_ratio:8.3f} {'<= 1.02':>14s}"
          f"   (pairs: {', '.join(f'{r:.3f}' for r in perf_ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
