"""``homodistil compare``: HomoDistil beside its alternatives, same budget, same data, several seeds.

Every run is the base config plus a size (one sparsity for FFN, head width and hidden size),
a seed and one variant's overrides (``VARIANTS``): nothing else differs, so the runs see the
same batches (a pure function of seed and step), the same held-out blocks and the same
teacher. Each run goes to ``ROOT/s{size}/{variant}/seed{seed}`` and ends with ``result.json``
(held-out KL/MLM curve, parameters, probe and fine-tuning scores); a run with that file is
skipped, so an interrupted sweep resumes. The teacher is evaluated once (``ROOT/teacher``).
``ROOT/results.json`` gathers everything and ``homodistil.compare_page`` turns it into the
results page with its plots.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# variant name -> (overrides on the base config, what it stands for)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "homodistil": ([], "(a) HomoDistil: start from the teacher, prune on the cubic schedule while distilling"),
    "oneshot": (["pruning.schedule=oneshot"],
                "(b) one-shot: prune the teacher to the final widths at step 0 (same metric), then distill"),
    "scratch": (["model.init=scratch"],
                "(c) from scratch: random student of the final shape, distilled with the same losses"),
    "magnitude": (["pruning.metric=magnitude"], "(d) HomoDistil with magnitude instead of sensitivity importance"),
    "no-kl": (["loss.alpha_pred=0"], "(e) HomoDistil without the prediction KL term"),
}


def run_dir(root: Path, size: float, variant: str, seed: int) -> Path:
    return root / f"s{size:g}" / variant / f"seed{seed}"


def run_overrides(root: Path, size: float, variant: str, seed: int, extra: list[str]) -> list[str]:
    """The overrides of one run: the user's, then size, seed, output dir (exported: it is evaluated), the shared
    block cache, and last the variant's."""
    return [*extra, f"pruning.sparsity.ffn={size}", f"pruning.sparsity.attention={size}",
            f"pruning.sparsity.hidden={size}", f"trainer.seed={seed}",
            f"trainer.output_dir={run_dir(root, size, variant, seed)}", "trainer.export=true",
            f"data.cache_dir={root / 'cache'}",
            *VARIANTS[variant][0]]


def evaluate_export(model_dir: str, cfg, out_dir: Path) -> dict:
    """Probe on every ``evaluate.tasks`` task, fine-tune on ``evaluate.finetune_tasks``: scores 0-100."""
    from homodistil.eval.report import EvalSettings, evaluate_models  # noqa: PLC0415

    e = cfg.evaluate

    def settings(**kw):
        return EvalSettings.from_config(e, do_latency=False, progress=False, **kw)

    probe = evaluate_models({"model": model_dir}, e.tasks, out_dir / "probe",
                            settings=settings(do_finetune=False))["models"]["model"]
    finetune = evaluate_models({"model": model_dir}, e.finetune_tasks or e.tasks, out_dir / "finetune",
                               settings=settings(do_probe=False))["models"]["model"]
    return {"params": probe["params"],
            "probe": {t: (r["probe"] or {}).get("main") for t, r in probe["tasks"].items()},
            "finetune": {t: (r["finetune"] or {}).get("main") for t, r in finetune["tasks"].items()}}


def _rows(path: Path) -> list[dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites steps after its checkpoint: keep the last
    return [rows[s] for s in sorted(rows)]


def run_one(config: str | None, overrides: list[str], meta: dict) -> dict:
    """Distill, export, evaluate one run; writes and returns its ``result.json``."""
    from homodistil.config import load_config  # noqa: PLC0415
    from homodistil.engine.recipe import distill  # noqa: PLC0415

    cfg = load_config(config, overrides)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out / "log.txt").open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        recipe = distill(cfg)
        train_s = time.perf_counter() - started
        scores = evaluate_export(str(out / "export"), cfg, out / "eval")
    curve = _rows(out / "heldout.jsonl")
    result = {**meta, "overrides": overrides, "teacher_dir": recipe.teacher_dir, "train_s": train_s,
              "wall_s": time.perf_counter() - started, "threads": _threads(), "heldout": curve, "final": curve[-1],
              **scores}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def teacher_eval(config: str | None, overrides: list[str], root: Path) -> dict:
    """The teacher's probe and fine-tuning scores, once per sweep (``ROOT/teacher/result.json``)."""
    from homodistil.config import load_config  # noqa: PLC0415
    from homodistil.engine.models import teacher_source  # noqa: PLC0415

    path = root / "teacher" / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = load_config(config, overrides)
    teacher_dir = _teacher_dir(root)
    if teacher_dir is None:
        raise RuntimeError(f"no finished run under {root} names its teacher")
    started = time.perf_counter()
    (root / "teacher").mkdir(parents=True, exist_ok=True)
    with (root / "teacher" / "log.txt").open("a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        scores = evaluate_export(teacher_dir, cfg, root / "teacher" / "eval")
    result = {"path": teacher_dir, "source": teacher_source(cfg.model), "wall_s": time.perf_counter() - started,
              **scores}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _teacher_dir(root: Path) -> str | None:
    """The (prepared) teacher the finished runs distilled from."""
    for path in sorted(root.glob("s*/*/seed*/result.json")):
        return json.loads(path.read_text())["teacher_dir"]
    return None


def _threads() -> int:
    import torch  # noqa: PLC0415

    return torch.get_num_threads()


def _init_worker(threads: int) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)


def machine() -> dict:
    import torch  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}


def compare_main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from homodistil.config import ConfigError, load_config  # noqa: PLC0415

    root = Path(args.out)
    try:
        sizes = [float(s) for s in args.sizes.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes ({args.sizes}) and --seeds ({args.seeds}) take comma-separated numbers") from None
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    base = load_config(args.config, args.overrides)  # fails early on a bad config
    if not base.trainer.eval_every:
        raise ConfigError("compare needs trainer.eval_every > 0 (the held-out KL curve)")
    # seed-major, then variant: a sweep cut short still has every variant at every size for its first seeds,
    # and the variants in the order given (the headline ones first) for the seed it was on
    plan = [(size, variant, seed) for seed in seeds for variant in variants for size in sizes]
    for size, variant, seed in plan:  # every run's config is valid before the first one starts
        load_config(args.config, run_overrides(root, size, variant, seed, args.overrides))
    root.mkdir(parents=True, exist_ok=True)
    todo = [(s, v, k) for s, v, k in plan if not (run_dir(root, s, v, k) / "result.json").exists()]
    print(f"compare: {len(plan)} runs ({len(plan) - len(todo)} already done) under {root}, "
          f"{args.jobs} at a time", flush=True)
    jobs = [(args.config, run_overrides(root, s, v, k, args.overrides), {"size": s, "variant": v, "seed": k})
            for s, v, k in todo]
    started = time.perf_counter()
    if not args.page_only:
        if args.jobs == 1:
            for job in jobs:
                _report_done(run_one(*job), started)
        else:
            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                for fut in [pool.submit(run_one, *job) for job in jobs]:
                    _report_done(fut.result(), started)
    command = ["homodistil", "compare", *(a for a in argv if a != "--page-only")]  # what makes the runs
    results = collect(root, args, base, plan, command)
    from homodistil.compare_page import write_page  # noqa: PLC0415

    page = write_page(results, Path(args.page))
    print(f"results: {root / 'results.json'}; page: {page}", flush=True)
    return 0


def _report_done(result: dict, started: float) -> None:
    f = result["final"]
    print(f"  done s={result['size']:g} {result['variant']} seed {result['seed']}: KL {f['kl']:.4f} "
          f"MLM {f['mlm_loss']:.3f} probe {result['probe']} ft {result['finetune']} "
          f"({result['wall_s'] / 60:.1f} min; {(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)


def collect(root: Path, args, base, plan: list[tuple[float, str, int]], argv: list[str]) -> dict:
    """The finished runs of ``plan`` and the teacher's scores -> ``ROOT/results.json``."""
    runs = [json.loads((run_dir(root, *run) / "result.json").read_text()) for run in plan
            if (run_dir(root, *run) / "result.json").exists()]
    teacher = teacher_eval(args.config, args.overrides, root) if runs else None
    results = {"command": " ".join(argv), "root": str(root),
               "config": args.config, "overrides": args.overrides, "sizes": args.sizes, "seeds": args.seeds,
               "variants": {v: VARIANTS[v][1] for v in args.variants.split(",")}, "jobs": args.jobs,
               "machine": machine(), "base": json.loads(base.model_dump_json()), "teacher": teacher, "runs": runs}
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="homodistil compare",
        description="Run HomoDistil and its alternatives (one-shot pruning, distillation from scratch, magnitude "
                    "importance, no prediction KL) with the same steps, data and seeds at several sizes; evaluate "
                    "each student and write the results page.")
    p.add_argument("config", help="base config, e.g. configs/compare.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    p.add_argument("--sizes", default="0.29,0.5",
                   help="comma-separated sparsities for FFN, head width and hidden size (default 0.29,0.5: about "
                        "50%% and 25%% of the MiniLM teacher's non-embedding parameters)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="runs/compare", help="root of the run directories (default runs/compare)")
    p.add_argument("--page", default="docs/results.md", help="results page to write; plots go beside it in "
                                                              "a folder of the same name (default docs/results.md)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process with "
                                                       "cores/jobs threads (default 1: in this process)")
    p.add_argument("--page-only", action="store_true", help="run nothing: gather the finished runs, write the page")
    return p
