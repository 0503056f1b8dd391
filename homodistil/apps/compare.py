"""``homodistil compare``: HomoDistil beside its alternatives, same budget, same data, several seeds.

Every run is the base config plus a size (one sparsity for FFN, head width and hidden size),
a seed and one variant's overrides (``VARIANTS``): nothing else differs, so the runs see the
same batches (a pure function of seed and step), the same held-out blocks and the same
teacher. Each run goes to ``ROOT/s{size}/{variant}/seed{seed}`` and ends with ``result.json``
(held-out KL/MLM curve, parameters, probe and fine-tuning scores); a run with that file is
skipped, so an interrupted sweep resumes. The teacher is evaluated once (``ROOT/teacher``).
``ROOT/results.json`` gathers everything and ``homodistil.apps.compare_page`` turns it into the
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
from typing import NamedTuple

class Variant(NamedTuple):
    overrides: list[str]  # on the base config; "{t_i}", "{t_f}", "{mask_interval}" ... name the run's schedule
    description: str
    tf_ratio: float | None = None  # budget runs: t_f / T for this row (None: the sweep's --tf-ratio)


# variant name -> (overrides on the base config, what it stands for)
VARIANTS: dict[str, Variant] = {
    "homodistil": Variant([], "(a) HomoDistil: start from the teacher, prune on the cubic schedule while distilling"),
    "oneshot": Variant(["pruning.schedule=oneshot"],
                       "(b) one-shot: prune the teacher to the final widths at step 0 (same metric), then distill"),
    "scratch": Variant(["model.init=scratch"],
                       "(c) from scratch: random student of the final shape, distilled with the same losses"),
    "magnitude": Variant(["pruning.metric=magnitude"],
                         "(d) HomoDistil with magnitude instead of sensitivity importance"),
    "no-kl": Variant(["loss.alpha_pred=0"], "(e) HomoDistil without the prediction KL term"),
}
# the rows of the budget studies beside (a) and (b) (issues 13 and 24): each is (a) or (b) with one setting changed
ABLATIONS: dict[str, Variant] = {
    "platon": Variant(["pruning.metric=platon"], "(a) with PLATON importance (both EMAs updated every step)"),
    "sensitivity": Variant(["pruning.metric=sensitivity"],
                           "(a) with sensitivity importance (|w·g| averaged since the last mask update)"),
    "platon-window": Variant(
        ["pruning.metric=platon", "pruning.platon_window={mask_interval}"],
        "(a) with PLATON as its reference implementation does it: |w·g| averaged over each mask interval, "
        "the EMAs updated once per interval"),
    "tf0.8": Variant([], "(a) with t_f = 0.8·T: 20% of the run at the final width instead of 50%", tf_ratio=0.8),
    "tf0.25": Variant([], "(a) with t_f = 0.25·T: 75% of the run at the final width", tf_ratio=0.25),
    "tf0.1": Variant([], "(a) with t_f = 0.1·T: 90% of the run at the final width (nearly one-shot, but "
                         "reached gradually)", tf_ratio=0.1),
    "lr-floor": Variant(["optimizer.min_lr_ratio=0.5"], "(a) with the LR decaying to half its peak, not to 0"),
    "oneshot-lr-floor": Variant(["pruning.schedule=oneshot", "optimizer.min_lr_ratio=0.5"],
                                "(b) with the same LR floor"),
    "alm0": Variant(["loss.alpha_lm=0"], "(a) distillation only (α_lm = 0): the data can no longer pull the "
                    "student past the teacher"),
    "oneshot-alm0": Variant(["pruning.schedule=oneshot", "loss.alpha_lm=0"], "(b) distillation only (α_lm = 0)"),
    "score-after": Variant(["pruning.score_after={t_i}"],
                           "(a) with no scoring before t_i (no early scores from the MLM term alone)"),
}
ROWS: dict[str, Variant] = {**VARIANTS, **ABLATIONS}


# a run's schedule (results.json "schedules", the variants' "{...}" templates): its keys and their config keys
SCHEDULE_KEYS = {"max_steps": "trainer.max_steps", "t_i": "pruning.t_i", "t_f": "pruning.t_f",
                 "mask_interval": "pruning.mask_interval", "shrink_interval": "pruning.shrink_interval",
                 "eval_every": "trainer.eval_every"}


def budget_schedule(steps: int, tf_ratio: float, t_i: int, s_final: float, max_drop: float) -> dict[str, int]:
    """A run of ``steps`` total steps: t_f = tf_ratio · steps, the cadence of pruning.schedule.budget_cadence and
    ~10 held-out evaluations."""
    from homodistil.pruning.schedule import budget_cadence  # noqa: PLC0415

    t_f = round(tf_ratio * steps)
    mask, shrink = budget_cadence(t_i, t_f, s_final, max_drop)
    return {"max_steps": steps, "t_i": t_i, "t_f": t_f, "mask_interval": mask, "shrink_interval": shrink,
            "eval_every": max(1, steps // 10)}


def base_schedule(cfg) -> dict[str, int]:
    """The base config's own schedule (runs without a budget), in :data:`SCHEDULE_KEYS`."""
    return {key: getattr(getattr(cfg, dotted.split(".")[0]), dotted.split(".")[1])
            for key, dotted in SCHEDULE_KEYS.items()}


def run_dir(root: Path, size: float, variant: str, seed: int, budget: int | None = None) -> Path:
    return (root / f"T{budget}" if budget else root) / f"s{size:g}" / variant / f"seed{seed}"


def run_overrides(root: Path, size: float, variant: str, seed: int, extra: list[str],
                  budget: int | None = None, schedule: dict[str, int] | None = None) -> list[str]:
    """The overrides of one run: the user's, then size, seed, output dir (exported: it is evaluated), the shared
    block cache, the budget's schedule (budget runs), and last the variant's (its templates filled from
    ``schedule``)."""
    steps = [f"{SCHEDULE_KEYS[key]}={value}" for key, value in schedule.items()] if budget else []
    return [*extra, f"pruning.sparsity.ffn={size}", f"pruning.sparsity.attention={size}",
            f"pruning.sparsity.hidden={size}", f"trainer.seed={seed}",
            f"trainer.output_dir={run_dir(root, size, variant, seed, budget)}", "trainer.export=true",
            f"data.cache_dir={root / 'cache'}", *steps,
            *(o.format(**(schedule or {})) for o in ROWS[variant].overrides)]


def probe_export(model_dir: str, cfg, out_dir: Path) -> dict:
    """Parameters and a linear probe on every ``evaluate.tasks`` task: scores 0-100."""
    from homodistil.eval.report import EvalSettings, evaluate_models  # noqa: PLC0415

    settings = EvalSettings.from_config(cfg.evaluate, do_latency=False, progress=False, do_finetune=False)
    probe = evaluate_models({"model": model_dir}, cfg.evaluate.tasks, out_dir / "probe", settings=settings)
    probe = probe["models"]["model"]
    return {"params": probe["params"], "probe": {t: (r["probe"] or {}).get("main") for t, r in probe["tasks"].items()}}


def evaluation_record(cfg) -> dict:
    """``cfg.evaluate`` as the evaluation runs it: its null knobs (epochs, lr, max length) filled with the
    quick preset's (``EvalSettings``, their owner), and the fine-tuning batch, so that the page states what ran."""
    from homodistil.eval.report import EvalSettings  # noqa: PLC0415

    ft = EvalSettings.from_config(cfg.evaluate).finetune
    return {**json.loads(cfg.evaluate.model_dump_json()), "epochs": ft.epochs, "lr": ft.lr, "max_length": ft.max_length,
            "batch_size": ft.batch_size}


def finetune_export(model_dir: str, cfg, out_dir: Path) -> dict[str, float | None]:
    """Fine-tuning on ``evaluate.finetune_tasks`` (default: every task): scores 0-100."""
    from homodistil.eval.report import EvalSettings, evaluate_models  # noqa: PLC0415

    e = cfg.evaluate
    settings = EvalSettings.from_config(e, do_latency=False, progress=False, do_probe=False)
    finetune = evaluate_models({"model": model_dir}, e.finetune_tasks or e.tasks, out_dir / "finetune",
                               settings=settings)["models"]["model"]
    return {t: (r["finetune"] or {}).get("main") for t, r in finetune["tasks"].items()}


def _rows(path: Path) -> list[dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites steps after its checkpoint: keep the last
    return [rows[s] for s in sorted(rows)]


def run_one(config: str | None, overrides: list[str], meta: dict) -> dict:
    """Distill, export and probe one run; writes and returns its ``result.json`` (``finetune`` empty: fine-tuning
    is its own job, :func:`finetune_one`, run after every distillation of the sweep)."""
    from homodistil.config import load_config  # noqa: PLC0415
    from homodistil.engine.recipe import distill  # noqa: PLC0415

    cfg = load_config(config, overrides)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out / "log.txt").open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        recipe = distill(cfg)
        train_s = time.perf_counter() - started
        scores = probe_export(str(out / "export"), cfg, out / "eval")
    curve = _rows(out / "heldout.jsonl")
    result = {**meta, "overrides": overrides, "settings": run_settings(cfg), "teacher_dir": recipe.teacher_dir,
              "teacher": teacher_identity(cfg, recipe.teacher_dir), "train_s": train_s,
              "wall_s": time.perf_counter() - started, "threads": _threads(), "heldout": curve, "final": curve[-1],
              **scores, "finetune": {}}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_settings(cfg) -> dict:
    """What defines a run's training, beside its teacher: the trainer, pruning and loss sections, resolved."""
    return {key: json.loads(getattr(cfg, key).model_dump_json()) for key in ("trainer", "pruning", "loss")}


def teacher_identity(cfg, teacher_dir: str | None) -> dict:
    """Which teacher a run distilled: its source and, for a prepared one, the preparation (steps, lr, batch) and
    its held-out figures, from the prepared folder's record."""
    from homodistil.engine.models import teacher_source  # noqa: PLC0415
    from homodistil.engine.prepare import PREP_FILE  # noqa: PLC0415

    out = {"source": teacher_source(cfg.model), "dir": teacher_dir}
    record = Path(teacher_dir) / PREP_FILE if teacher_dir else None
    if record is not None and record.is_file():
        out["prepare"] = json.loads(record.read_text())
    return out


def finetune_one(config: str | None, overrides: list[str], result_path: Path) -> dict:
    """Fine-tune a finished run's (or the teacher's) exported model; adds ``finetune`` (and ``finetune_s``) to its
    ``result.json``. The distillation is not touched, so a sweep can fine-tune runs an earlier sweep only probed."""
    from homodistil.config import load_config  # noqa: PLC0415

    cfg = load_config(config, overrides)
    result = json.loads(result_path.read_text())
    started = time.perf_counter()
    with (result_path.parent / "log.txt").open("a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        model_dir = result.get("path") or str(result_path.parent / "export")  # the teacher's result names its path
        result["finetune"] = finetune_export(model_dir, cfg, result_path.parent / "eval")
    result["finetune_s"] = time.perf_counter() - started
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def teacher_eval(config: str | None, overrides: list[str], root: Path) -> dict:
    """The teacher's probe scores, once per sweep (``ROOT/teacher/result.json``; :func:`finetune_one` adds its
    fine-tuning scores)."""
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
        scores = probe_export(teacher_dir, cfg, root / "teacher" / "eval")
    result = {"path": teacher_dir, "source": teacher_source(cfg.model), "wall_s": time.perf_counter() - started,
              **scores, "finetune": {}}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _teacher_dir(root: Path) -> str | None:
    """The (prepared) teacher the finished runs distilled from."""
    for path in sorted(root.glob("**/seed*/result.json")):
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


class Run(NamedTuple):
    budget: int | None  # total steps T (None: the base config's)
    size: float
    variant: str
    seed: int


def _numbers(text: str, kind, flag: str) -> list:
    from homodistil.config import ConfigError  # noqa: PLC0415

    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} ({text}) takes comma-separated numbers") from None


def sweep_plan(args) -> tuple[list[Run], dict[int | None, list[int]]]:
    """The runs of a sweep and the seeds at each budget. Seed-major, then budget (smallest first), then variant,
    then size, and each seed's ablation rows last: a sweep cut short has every variant at every budget and size for
    its first seeds, and the variants in the order given (the headline ones first) for the seed it was on."""
    from homodistil.config import ConfigError  # noqa: PLC0415

    sizes = _numbers(args.sizes, float, "--sizes")
    seeds = _numbers(args.seeds, int, "--seeds")
    budgets: list[int | None] = sorted(_numbers(args.budgets, int, "--budgets")) if args.budgets else [None]
    variants, ablations = args.variants.split(","), [a for a in (args.ablations or "").split(",") if a]
    unknown = [v for v in variants + ablations if v not in ROWS]
    if unknown:
        raise ConfigError(f"--variants/--ablations: unknown {unknown}; choose from {', '.join(ROWS)}")
    at: dict[int | None, list[int]] = dict.fromkeys(budgets, seeds)
    for spec in args.budget_seeds or []:
        budget, _, listed = spec.partition("=")
        budget = _numbers(budget, int, "--budget-seeds")
        if len(budget) != 1 or budget[0] not in at or not listed:
            raise ConfigError(f"--budget-seeds {spec}: expected T=SEEDS with T one of --budgets ({args.budgets})")
        at[budget[0]] = _numbers(listed, int, "--budget-seeds")
    ablation_budget = args.ablation_budget if args.budgets else None
    if ablations and args.budgets and ablation_budget not in at:
        raise ConfigError(f"--ablations run at --ablation-budget, which must be one of --budgets ({args.budgets})")
    plan = []
    for seed in dict.fromkeys([*seeds, *(k for ks in at.values() for k in ks)]):  # --seeds' order first
        plan += [Run(b, size, v, seed) for b in budgets if seed in at[b] for v in variants for size in sizes]
        if ablations and seed in at[ablation_budget]:
            plan += [Run(ablation_budget, size, a, seed) for a in ablations for size in sizes
                     if Run(ablation_budget, size, a, seed) not in plan]
    return plan, at


def schedule_of(run: Run, args, base) -> dict[str, int]:
    """The run's schedule: the budget's (t_f from the row's or the sweep's ratio), else the base config's."""
    if run.budget is None:
        return base_schedule(base)
    ratio = ROWS[run.variant].tf_ratio or args.tf_ratio
    return budget_schedule(run.budget, ratio, base.pruning.t_i, run.size, args.max_drop)


def compare_main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from homodistil.config import ConfigError, load_config  # noqa: PLC0415

    root = Path(args.out)
    base = load_config(args.config, args.overrides)  # fails early on a bad config
    if not args.page_only:  # and on missing evaluation data, before the first run
        from homodistil.eval.tasks import require_tasks  # noqa: PLC0415

        require_tasks([*base.evaluate.tasks, *(base.evaluate.finetune_tasks or [])])
    if not base.trainer.eval_every:
        raise ConfigError("compare needs trainer.eval_every > 0 (the held-out KL curve)")
    plan, _ = sweep_plan(args)
    tuned = finetune_budgets(args, plan)
    jobs = []
    for run in plan:  # every run's config is valid before the first one starts
        schedule = schedule_of(run, args, base)
        overrides = run_overrides(root, run.size, run.variant, run.seed, args.overrides, run.budget, schedule)
        load_config(args.config, overrides)
        meta = {"size": run.size, "variant": run.variant, "seed": run.seed, "budget": run.budget,
                "schedule": schedule}
        jobs.append((run, (args.config, overrides, meta)))
    root.mkdir(parents=True, exist_ok=True)
    result_of = {run: run_dir(root, run.size, run.variant, run.seed, run.budget) / "result.json" for run in plan}
    todo = [job for run, job in jobs if not result_of[run].exists()]
    which = ("every run" if tuned is None else
             "the runs at T = " + ", ".join(map(str, sorted(tuned))) if tuned else "no run")
    print(f"compare: {len(plan)} runs ({len(plan) - len(todo)} already distilled) under {root}, "
          f"{args.jobs} at a time; then fine-tuning of {which} and the teacher", flush=True)
    started = time.perf_counter()
    if not args.page_only:
        if todo and args.jobs > 1:
            _ready_teacher_once(*todo[0][:2])
        with _pool(args.jobs) as submit:
            for fut in [submit(run_one, *job) for job in todo]:
                _report_done(fut.result(), started)
            if tuned is None or tuned:  # the teacher first: the longest fine-tuning
                teacher_eval(args.config, args.overrides, root)
                paths = [root / "teacher" / "result.json"]
                paths += [result_of[run] for run, _ in jobs if tuned is None or run.budget in tuned]
                for fut in [submit(finetune_one, args.config, args.overrides, path) for path in paths
                            if not json.loads(path.read_text())["finetune"]]:
                    _report_done(fut.result(), started)
    command = ["homodistil", "compare", *(a for a in argv if a != "--page-only")]  # what makes the runs
    results = collect(root, args, base, plan, command)
    from homodistil.apps.compare_page import write_page, write_study  # noqa: PLC0415

    page = (write_study if args.budgets else write_page)(results, Path(args.page))
    print(f"results: {root / 'results.json'}; page: {page}", flush=True)
    return 0


def _ready_teacher_once(config: str | None, overrides: list[str]) -> None:
    """Prepare the sweep's teacher (a head-less encoder gets its MLM head; cached) before the workers start, in a
    process of its own with every core: workers started on a cold cache would each prepare the same teacher."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        path = pool.submit(_ready_teacher, config, overrides).result()
    print(f"compare: teacher ready ({path or 'built on the spot'})", flush=True)


def _ready_teacher(config: str | None, overrides: list[str]) -> str | None:
    # a single process of its own: launcher variables inherited from a parent that ran in-process (the tests) would
    # point it at the parent's rendezvous store
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    from homodistil.config import load_config  # noqa: PLC0415
    from homodistil.engine.recipe import ready_teacher  # noqa: PLC0415

    return ready_teacher(load_config(config, overrides))


class _Later:
    """A job of a sweep run in this process, when its result is asked for (the runs report one by one)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


@contextlib.contextmanager
def _pool(jobs: int):
    """``submit(fn, *args) -> future``: in this process (jobs == 1), else in ``jobs`` processes of cores/jobs
    threads each."""
    if jobs == 1:
        yield _Later
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        yield pool.submit


def finetune_budgets(args, plan: list[Run]) -> set[int] | None:
    """The budgets whose runs are fine-tuned (``--finetune-budgets``); None: every run (and every sweep without
    ``--budgets``)."""
    from homodistil.config import ConfigError  # noqa: PLC0415

    if not args.budgets or args.finetune_budgets is None:
        return None
    if args.finetune_budgets.strip().lower() == "none":
        return set()
    tuned = set(_numbers(args.finetune_budgets, int, "--finetune-budgets"))
    if tuned - {r.budget for r in plan}:
        raise ConfigError(f"--finetune-budgets {args.finetune_budgets}: each must be one of --budgets "
                          f"({args.budgets})")
    return tuned


def _report_done(result: dict, started: float) -> None:
    elapsed = f"{(time.perf_counter() - started) / 60:.1f} min so far"
    if "final" not in result:  # the teacher
        print(f"  done teacher: probe {result['probe']} ft {result['finetune']} ({elapsed})", flush=True)
        return
    f, budget = result["final"], f"T={result['budget']} " if result.get("budget") else ""
    took = result.get("finetune_s", result["wall_s"])
    print(f"  done {budget}s={result['size']:g} {result['variant']} seed {result['seed']}: KL {f['kl']:.4f} "
          f"MLM {f['mlm_loss']:.3f} probe {result['probe']} ft {result['finetune']} "
          f"({took / 60:.1f} min; {elapsed})", flush=True)


def swapped_units(root: Path, run: dict) -> dict[str, int] | None:
    """Of the teacher units (a) HomoDistil kept at the run's budget, size and seed, how many the run pruned (it
    kept as many others instead): ``{"units", "kept"}`` from both exports' ``kept_units.json``; None where either
    is missing (a run made before the file existed, or (a) not finished)."""
    from homodistil.apps.compare_page import REFERENCE  # noqa: PLC0415
    from homodistil.engine.export import KEPT_UNITS  # noqa: PLC0415

    paths = [run_dir(root, run["size"], v, run["seed"], run.get("budget")) / "export" / KEPT_UNITS
             for v in (REFERENCE, run["variant"])]
    if run["variant"] == REFERENCE or not all(p.exists() for p in paths):
        return None
    a, other = (json.loads(p.read_text()) for p in paths)
    return {"units": sum(len(set(a[g]) - set(other[g])) for g in a), "kept": sum(len(a[g]) for g in a)}


def collect(root: Path, args, base, plan: list[Run], argv: list[str]) -> dict:
    """The finished runs of ``plan``, the teacher's scores and the majority-class floor -> ``ROOT/results.json``."""
    paths = [run_dir(root, r.size, r.variant, r.seed, r.budget) / "result.json" for r in plan]
    runs = [json.loads(path.read_text()) for path in paths if path.exists()]
    for run in runs:
        run["swapped"] = swapped_units(root, run)
    teacher = teacher_eval(args.config, args.overrides, root) if runs else None
    variants = args.variants.split(",")
    ablations = [a for a in (args.ablations or "").split(",") if a]
    results = {"command": " ".join(argv), "root": str(root),
               "config": args.config, "overrides": args.overrides, "sizes": args.sizes, "seeds": args.seeds,
               "variants": {v: ROWS[v].description for v in variants}, "jobs": args.jobs,
               "machine": machine(), "base": {**json.loads(base.model_dump_json()), "evaluate": evaluation_record(base)},
               "teacher": teacher,
               "floor": majority_floor(base), "floor_sizes": train_sizes(base), "planned": len(plan), "runs": runs}
    if args.budgets:
        results.update({
            "budgets": sorted({r.budget for r in plan}), "tf_ratio": args.tf_ratio, "max_drop": args.max_drop,
            "ablations": {a: ROWS[a].description for a in ablations}, "ablation_budget": args.ablation_budget,
            "finetune_budgets": sorted(tuned) if (tuned := finetune_budgets(args, plan)) is not None else None,
            "plan": [r._asdict() for r in plan],
            "schedules": {f"{r.budget}/{r.variant}/{r.size:g}": schedule_of(r, args, base) for r in plan}})
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def train_sizes(cfg) -> dict[str, int]:
    """Per task of ``evaluate.tasks``: the whole training split's size (the compute estimate's fine-tuning steps)."""
    from homodistil.eval.tasks import load_task  # noqa: PLC0415

    return {task: len(load_task(task).train) for task in cfg.evaluate.tasks}


def majority_floor(cfg) -> dict[str, float]:
    """Per classification task of ``evaluate.tasks``: the score (0-100, as the probes and fine-tuning report it) of
    always answering the training split's most common label, on the same split and caps."""
    from collections import Counter  # noqa: PLC0415

    from homodistil.eval import metrics  # noqa: PLC0415
    from homodistil.eval.report import EvalSettings  # noqa: PLC0415
    from homodistil.eval.tasks import load_task  # noqa: PLC0415

    s = EvalSettings.from_config(cfg.evaluate)
    out = {}
    for task in cfg.evaluate.tasks:
        data = load_task(task, max_train=s.max_train, max_eval=s.max_eval, split_seed=s.split_seed)
        if data.spec.kind != "classification":
            continue
        top = Counter(data.train["label"]).most_common(1)[0][0]
        split = data.evals[data.spec.eval_splits[0]]
        out[task] = metrics.main_score(metrics.compute(data.spec.metrics, [top] * len(split), split["label"]))
    return out


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
    study = p.add_argument_group(
        "budget study", "(a) against (b) at several total budgets T, and ablation rows at one of them; the page "
        "gets the study's sections (docs/results.md keeps its other sections)")
    study.add_argument("--budgets", help="comma-separated total steps T: each run gets trainer.max_steps=T, "
                                         "pruning.t_f=tf_ratio·T, the largest mask interval within --max-drop, "
                                         "a shrink every ~5%% of the pruning window and ~10 held-out evaluations")
    study.add_argument("--tf-ratio", type=float, default=0.5, help="t_f / T (default 0.5)")
    study.add_argument("--max-drop", type=float, default=0.02,
                       help="most sparsity one mask update may add, as a fraction of each width (default 0.02)")
    study.add_argument("--budget-seeds", action="append", metavar="T=SEEDS",
                       help="seeds at budget T instead of --seeds, e.g. 4000=0,1 (repeatable)")
    study.add_argument("--ablations", help=f"comma-separated rows run at --ablation-budget, of: {', '.join(ROWS)}")
    study.add_argument("--ablation-budget", type=int, help="the budget T of the ablation rows (one of --budgets)")
    study.add_argument("--finetune-budgets", metavar="T[,T...]",
                       help="fine-tune only the runs at these budgets ('none': no run; default: every run); the "
                            "others get the "
                            "probes. Fine-tuning runs after every distillation of the sweep; a run an earlier sweep "
                            "only probed is fine-tuned from its export, not distilled again")
    return p
