"""The fault-injection harness at scale: N seeded trials, then the figures and the bad-input table.

    python benchmarks/faults.py                    # 20 trials, seed 0
    python benchmarks/faults.py --trials 50 --seed 3 --out /tmp/faults

Each trial takes the next fault kind in turn (SIGKILL at a step every other trial, SIGTERM,
SIGKILL during a checkpoint save, ENOSPC during a save, SIGKILL inside a shrink) and draws its step, a rank, a ZeRO
stage (0-3) and pre-built or streamed data; runs the tiny world-size-2 job of ``tests/fault_harness.py``
with it; relaunches it (``torchrun --max-restarts 1`` after a kill, a second launch after a
SIGTERM or a full disk); and compares the end with an uninterrupted run of the same
configuration: weights, masks, importance state, every checkpoint file and the losses, exactly.
Prints markdown tables (docs/faults.md holds a copy).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fault_harness as H  # noqa: E402


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def figures(results: list[H.Result]) -> str:
    by_kind: dict[str, list[H.Result]] = defaultdict(list)
    for r in results:
        by_kind[r.trial.kind].append(r)
    rows = []
    for kind, rs in sorted(by_kind.items()):
        lost = [r.steps_lost for r in rs if r.steps_lost is not None]
        beyond = [r.lost_beyond_checkpoint for r in rs if r.lost_beyond_checkpoint is not None]
        rows.append([kind, len(rs), sum(r.fault_seen for r in rs), sum(r.resumed_exactly for r in rs),
                     f"{statistics.mean(lost):.1f} / {max(lost)}" if lost else "-",
                     max(beyond) if beyond else "-", f"{sum(r.launches for r in rs)}"])
    total = [len(results), sum(r.fault_seen for r in results), sum(r.resumed_exactly for r in results)]
    rows.append(["**all**", *total, "", max((r.lost_beyond_checkpoint or 0) for r in results), 
                 sum(r.launches for r in results)])
    return _table(["fault", "trials", "fault took effect", "resumed exactly", "steps lost (mean / max)",
                   "lost beyond the last checkpoint (max)", "torchrun launches"], rows)


def trial_rows(results: list[H.Result]) -> str:
    rows = [[r.trial.fault, r.trial.stage, "streamed" if r.trial.streaming else "blocks", r.resumed_from,
             r.steps_lost, r.lost_beyond_checkpoint, "yes" if r.resumed_exactly else f"NO {r.exact}"]
            for r in results]
    return _table(["fault", "ZeRO", "data", "resumed from", "steps lost", "beyond checkpoint", "exact"], rows)


def bad_inputs(tmp: Path) -> str:
    rows = []
    for i, (what, make, expected) in enumerate(H.BAD_INPUTS):
        outcome, message = H.try_input(make, tmp / f"input{i}")
        message = message.replace(str(tmp / f"input{i}"), "…").replace("`", "'")
        rows.append([what, {"error": "stopped", "log": "handled, logged", "ok": "handled"}[outcome], f"`{message}`"])
    return _table(["bad input", "outcome", "message (one line)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="homodistil-faults-"))
    started = time.perf_counter()
    references: dict[tuple[int, bool, bool], Path] = {}
    results = []
    for i, trial in enumerate(H.random_trials(args.trials, args.seed)):
        key = trial.config
        if key not in references:
            ref = tmp / f"reference-zero{trial.stage}-{'stream' if trial.streaming else 'blocks'}"
            proc = H.launch(H.job(ref, *key))
            if proc.returncode:
                sys.exit(f"reference run failed:\n{proc.stderr[-4000:]}")
            references[key] = ref
        t0 = time.perf_counter()
        result = H.run_trial(trial, tmp / f"trial{i:03d}", references[key])
        results.append(result)
        print(f"trial {i + 1}/{args.trials}: {trial.fault} zero{trial.stage} "
              f"{'streamed' if trial.streaming else 'blocks'}: resumed from {result.resumed_from}, "
              f"lost {result.steps_lost}, exact={result.resumed_exactly} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\n## Fault-injection figures ({args.trials} trials, seed {args.seed}, "
          f"{(time.perf_counter() - started) / 60:.1f} min)\n")
    print(figures(results))
    print("\n### Trials\n")
    print(trial_rows(results))
    print("\n## Bad inputs\n")
    print(bad_inputs(tmp))
    print(f"\nruns in {tmp}")


if __name__ == "__main__":
    main()
