"""The results page of ``homodistil compare``: tables (mean ± std over seeds; differences between two rows paired by
seed, with a 95% confidence interval), the headline, plots.

Reads only ``ROOT/results.json`` (``homodistil.apps.compare.collect``), so the page can be
rewritten at any time (``homodistil compare CONFIG ... --page-only``). Plots go to a folder
beside the page named after it (``docs/results.md`` -> ``docs/results/``). A hand-written
reading between ``<!-- reading -->`` and ``<!-- /reading -->`` in an existing page is kept.
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

REFERENCE = "homodistil"
ALTERNATIVES = ("oneshot", "scratch")  # the headline: does (a) beat these at each size?
READING = re.compile(r"<!-- reading -->.*?<!-- /reading -->", re.S)
PLACEHOLDER = ("<!-- reading -->\n_No reading yet: write it here; `--page-only` keeps this section._\n"
               "<!-- /reading -->")


# ------------------------------------------------------------------------------------- numbers

def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, then the PNG (and the figure closed)."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path

def metrics(run: dict) -> dict[str, float | None]:
    """One run's figures: final held-out KL, its mean over the evaluations of the run (step 0 included), final
    MLM loss and masked accuracy, probe and fine-tuning scores."""
    out = {"kl": run["final"]["kl"], "kl_avg": statistics.fmean(r["kl"] for r in run["heldout"]),
           "mlm": run["final"]["mlm_loss"], "acc": 100 * run["final"]["masked_accuracy"]}
    out.update({f"probe {t}": v for t, v in run["probe"].items()})
    out.update({f"ft {t}": v for t, v in run["finetune"].items()})
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(m: float, s: float | None, digits: int) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def by_cell(runs: list[dict]) -> dict[tuple[float, str], dict[int, dict]]:
    """(size, variant) -> seed -> run."""
    cells: dict[tuple[float, str], dict[int, dict]] = {}
    for run in runs:
        cells.setdefault((run["size"], run["variant"]), {})[run["seed"]] = run
    return cells


def mean_ci95(diffs: list[float]) -> tuple[float, float | None, int]:
    """(mean, half-width of its 95% confidence interval, n) of paired differences: Student's t with n − 1 degrees of
    freedom (None below 2 values). With 2 or 3 seeds the interval is wide (t = 12.7 and 4.3): that is the point."""
    from scipy.stats import t as student_t  # noqa: PLC0415

    m, s = mean_std(diffs)
    n = len([d for d in diffs if d is not None])
    return m, (None if s is None else float(student_t.ppf(0.975, n - 1)) * s / math.sqrt(n)), n


def paired(cells, size: float, a: str, b: str, key: str) -> tuple[float, float | None, int]:
    """:func:`mean_ci95` of ``key(a) - key(b)`` over the seeds both finished (same data per seed)."""
    return paired_runs(cells.get((size, a), {}), cells.get((size, b), {}), key)


# ------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_curves(cells, size: float, variants: list[str], window: tuple[int, int], path: Path) -> Path:
    """Held-out KL(teacher ‖ student) and MLM loss over steps, mean over seeds with a min-max band; the
    shaded ``window`` (t_i, t_f) is where the cubic schedule prunes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax in axes:
        ax.axvspan(*window, color="grey", alpha=0.12, lw=0, label="pruning window (a, d, e)")
    for variant in variants:
        seeds = cells.get((size, variant))
        if not seeds:
            continue
        steps = [r["step"] for r in next(iter(seeds.values()))["heldout"]]
        for ax, key in zip(axes, ("kl", "mlm_loss")):
            series = [[r[key] for r in run["heldout"]] for run in seeds.values()
                      if [r["step"] for r in run["heldout"]] == steps]
            mean = [statistics.fmean(v) for v in zip(*series)]
            line, = ax.plot(steps, mean, marker=".", label=f"{variant} (n={len(series)})")
            ax.fill_between(steps, [min(v) for v in zip(*series)], [max(v) for v in zip(*series)],
                            color=line.get_color(), alpha=0.2)
    teacher_mlm = [run["final"]["teacher_mlm_loss"] for seeds in cells.values() for run in seeds.values()]
    if teacher_mlm:
        axes[1].axhline(statistics.fmean(teacher_mlm), color="black", ls="--", lw=1, label="teacher")
    axes[0].set(title=f"held-out KL(teacher ‖ student), sparsity {size:g}", xlabel="step",
                ylabel="nats / masked token")
    axes[0].set_yscale("symlog", linthresh=0.01)  # KL is exactly 0 at step 0 for the runs that start as the teacher
    axes[1].set(title=f"held-out MLM loss, sparsity {size:g}", xlabel="step", ylabel="nats / masked token")
    return _save(fig, axes, path)


def plot_scores(cells, teacher: dict | None, variants: list[str], keys: list[str], path: Path) -> Path:
    """Each downstream score against non-embedding parameters: mean ± std over seeds per variant and size."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
    markers = dict(zip(variants, "osD^vP*X"))
    for ax, key in zip(axes[0], keys):
        for i, variant in enumerate(variants):
            xs, ys, es = [], [], []
            for (size, v), seeds in sorted(cells.items()):
                if v != variant:
                    continue
                m, s = mean_std([metrics(r).get(key) for r in seeds.values()])
                dodge = 1 + 0.015 * (i - (len(variants) - 1) / 2)  # side by side, not on top of each other
                xs.append(statistics.fmean(r["params"]["non_embedding"] for r in seeds.values()) / 1e6 * dodge)
                ys.append(m)
                es.append(s or 0.0)
            ax.errorbar(xs, ys, yerr=es, marker=markers[variant], capsize=3, ls="-", lw=1,
                        color=f"C{i}", label=variant)
        if teacher:
            score = {**{f"probe {t}": v for t, v in teacher["probe"].items()},
                     **{f"ft {t}": v for t, v in teacher["finetune"].items()}}.get(key)
            if score is not None:
                ax.plot([teacher["params"]["non_embedding"] / 1e6], [score], marker="*", ms=12, color="black",
                        ls="", label="teacher")
        ax.set(title=key, xlabel="non-embedding parameters (M)", ylabel="score (0-100)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- page
def headline(cells, sizes: list[float]) -> list[str]:
    """Per size: (a) minus each alternative, paired by seed — KL, MLM loss, probe and fine-tuning scores."""
    keys = [k for k in _ordered({k for seeds in cells.values() for r in seeds.values() for k in metrics(r)})
            if k != "acc"]
    lines = ["| sparsity | (a) − … | " + " | ".join(_label(k) for k in keys) + " | seeds |",
             "|---|---|" + "---|" * len(keys) + "---|"]
    for size in sizes:
        for alt in ALTERNATIVES:
            cells_ok = (size, REFERENCE) in cells and (size, alt) in cells
            if not cells_ok:
                continue
            row, n = [], 0
            for key in keys:
                m, half, n_key = paired(cells, size, REFERENCE, alt, key)
                n = max(n, n_key)
                row.append(diff_cell(m, half, 3 if key in LOSSES else 1, mark=True))
            lines.append(f"| {size:g} | {alt} | " + " | ".join(row) + f" | {n} |")
    return lines


LOSSES = ("kl", "kl_avg", "mlm")


def _ordered(keys) -> list[str]:
    """Losses first (KL, KL over the run, MLM loss), then masked accuracy, then the scores by name."""
    first = [*LOSSES, "acc"]
    return sorted(keys, key=lambda k: (first.index(k) if k in first else len(first), k))


def _label(key: str) -> str:
    return {"kl": "held-out KL ↓", "kl_avg": "KL, mean over run ↓", "mlm": "MLM loss ↓",
            "acc": "masked acc. % ↑"}.get(key, key + " ↑")


def write_page(results: dict, page: Path) -> Path:
    page = Path(page)
    figs = page.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    runs, teacher = results["runs"], results.get("teacher")
    cells = by_cell(runs)
    variants = [v for v in results["variants"] if any(v == cv for _, cv in cells)]
    sizes = sorted({s for s, _ in cells}, reverse=True)
    keys = _ordered({k for r in runs for k in metrics(r)})
    score_keys = [k for k in keys if k.startswith(("probe", "ft"))]
    base, machine = results["base"], results["machine"]
    steps = base["trainer"]["max_steps"]
    seeds_done = sorted({r["seed"] for r in runs})
    planned = results.get("planned") or (len(results["sizes"].split(",")) * len(results["seeds"].split(","))
                                         * len(results["variants"]))
    lines = ["# HomoDistil against its alternatives, at small scale", "",
             f"_Generated by `homodistil.apps.compare_page` from `{results.get('root', 'runs/compare')}/results.json`: "
             f"{len(runs)} of {planned} planned runs finished (seeds {', '.join(map(str, seeds_done))})._", ""]
    if len(runs) < planned:
        lines += [f"**Partial sweep**: {planned - len(runs)} runs did not finish; every figure below is over the "
                  "runs that did (the `seeds` column says how many).", ""]
    lines += ["## Headline: (a) HomoDistil minus (b) one-shot and (c) from scratch", "",
              "Paired by seed (each seed: same batches, same held-out blocks): mean ± the half-width of its 95% "
              "confidence interval over seeds (t-distribution); bold where the interval excludes 0. "
              "KL and MLM loss: lower is better, so a negative difference favours (a); scores: higher is better.",
              "", *headline(cells, sizes), ""]
    lines += ["## What was run", ""]
    lines += [f"- **{v}** — {desc}" for v, desc in results["variants"].items()]
    lines += ["", f"Every run: teacher `{base['model']['teacher']}`, data `{base['data']['source']}` "
              f"(blocks of {base['data']['max_seq_length']} tokens), {steps} steps of batch "
              f"{base['deepspeed']['train_micro_batch_size_per_gpu']}, AdamW lr {base['optimizer']['lr']} "
              f"(warm-up {base['optimizer']['warmup_steps']}), losses α_lm={base['loss']['alpha_lm']} "
              f"α_pred={base['loss']['alpha_pred']} α_hid={base['loss']['alpha_hidden']} "
              f"α_att={base['loss']['alpha_attention']}; importance `{base['pruning']['metric']}`; cubic schedule "
              f"t_i={base['pruning']['t_i']}, t_f={base['pruning']['t_f']}, masks every "
              f"{base['pruning']['mask_interval']} steps, shrink every {base['pruning']['shrink_interval']}; one-shot "
              f"scores {base['pruning']['calibration_steps']} calibration batches. Held-out figures: "
              f"{base['evaluate']['heldout_blocks']} fixed held-out blocks, every {base['trainer']['eval_every']} "
              f"steps. Downstream: linear probe on {', '.join(base['evaluate']['tasks'])}; fine-tuning on "
              f"{', '.join(base['evaluate']['finetune_tasks'] or base['evaluate']['tasks'])} "
              f"({base['evaluate']['max_train']} train / {base['evaluate']['max_eval']} validation examples, "
              f"{base['evaluate']['epochs']} epoch, lr {base['evaluate']['lr']}).", ""]
    lines += ["## Results (mean ± std over seeds)", ""]
    head = ["sparsity", "variant", "non-emb. params (M)", *(_label(k) for k in keys), "seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher:
        t_scores = {**{f"probe {t}": v for t, v in teacher["probe"].items()},
                    **{f"ft {t}": v for t, v in teacher["finetune"].items()}}
        t_mlm = mean_std([r["final"]["teacher_mlm_loss"] for r in runs])
        cells_t = {"kl": "0", "kl_avg": "0", "mlm": fmt(*t_mlm, 3), "acc": "–"}
        cells_t.update({k: fmt(t_scores[k], None, 1) if t_scores.get(k) is not None else "–" for k in score_keys})
        lines.append(f"| 0 | **teacher** | {teacher['params']['non_embedding'] / 1e6:.2f} | "
                     + " | ".join(cells_t[k] for k in keys) + " | – |")
    t_params = teacher["params"]["non_embedding"] if teacher else None
    for size in sizes:
        for variant in variants:
            seeds = cells.get((size, variant))
            if not seeds:
                continue
            params = statistics.fmean(r["params"]["non_embedding"] for r in seeds.values())
            share = f" ({100 * params / t_params:.0f}%)" if t_params else ""
            row = [fmt(*mean_std([metrics(r).get(k) for r in seeds.values()]), 3 if k in LOSSES else 1)
                   for k in keys]
            lines.append(f"| {size:g} | {variant} | {params / 1e6:.2f}{share} | " + " | ".join(row)
                         + f" | {len(seeds)} |")
    lines += ["", "Held-out KL = KL(p_teacher ‖ p_student) and MLM loss at the masked positions of the held-out "
              "blocks after the last step (nats per masked token); KL mean over run = the mean of the held-out KL "
              "over every evaluation of the run, step 0 included (the gap kept throughout). Scores 0-100: the mean of "
              "accuracy and F1 (rt-polarity) or of accuracy and macro-F1 (tweets-3class); ft = fine-tuned, "
              "probe = logistic regression on frozen mean-pooled embeddings.", ""]
    lines += ["## Plots", ""]
    for size in sizes:
        window = (base["pruning"]["t_i"], base["pruning"]["t_f"])
        path = plot_curves(cells, size, variants, window, figs / f"heldout_s{size:g}.png")
        lines += [f"![held-out KL and MLM loss over steps, sparsity {size:g}]({figs.name}/{path.name})", ""]
    if score_keys:
        path = plot_scores(cells, teacher, variants, score_keys, figs / "scores_vs_params.png")
        lines += [f"![downstream scores against parameters]({figs.name}/{path.name})", ""]
    lines += ["Curves: mean over seeds, band = min-max over seeds. Scores: mean ± std over seeds.", ""]
    lines += ["## Reading", "", PLACEHOLDER, ""]
    wall = [r["wall_s"] for r in runs]
    lines += ["## How to regenerate", "", "```bash", results["command"],
              "# rewrite this page (and its plots) from the finished runs only:",
              results["command"] + " --page-only", "```", "",
              f"Machine: {machine['cpu']}, {machine['cores']} cores, CUDA {'yes' if machine['cuda'] else 'no'}, "
              f"torch {machine['torch']}, Python {machine['python']} ({machine['platform']}); "
              f"{results['jobs']} run(s) at a time"
              + (f", {statistics.fmean(wall) / 60:.1f} min per run (distill + evaluation), "
                 f"{sum(wall) / 60:.0f} run-minutes in all." if wall else "."), ""]
    text = "\n".join(lines)
    if page.exists():
        old = page.read_text()
        kept = READING.search(old)
        if kept:
            text = text.replace(PLACEHOLDER, kept.group(0))
        studies = [m.group(0) for m in STUDY.finditer(old)]  # the budget studies' sections (write_study) stay
        if studies:
            first = text.find("\n## ")
            text = text[:first + 1] + "\n\n".join(studies) + "\n\n" + text[first + 1:]
    page.write_text(text)
    return page


# ------------------------------------------------------------------------------------- budget study
STUDY = re.compile(r"<!-- study( [^>]*?)? -->.*?<!-- /study\1 -->", re.S)  # one per results root
LEGACY_ROOT = "runs/budget"  # the first study's block was written without its root
BASELINE = "oneshot"  # the study's question: does (a) beat (b) at some budget?


def study_pattern(root: str) -> re.Pattern:
    """The page block of the study whose results live under ``root``."""
    named = rf"<!-- study {re.escape(root)} -->.*?<!-- /study {re.escape(root)} -->"
    return re.compile(named + (r"|<!-- study -->.*?<!-- /study -->" if root == LEGACY_ROOT else ""), re.S)


def teacher_label(results: dict) -> str:
    """The teacher a study distilled, in words: a prepared encoder says how many steps trained its MLM head (the
    first study's 300-step head was a teacher its students outgrew)."""
    model = results["base"]["model"]
    steps = {r["teacher"]["prepare"]["steps"] for r in results["runs"] if (r.get("teacher") or {}).get("prepare")}
    if not steps and model["teacher"] == "minilm":  # runs made before result.json recorded the teacher
        steps = {model["prepare"]["steps"]}
    return (f"`{model['teacher']}` teacher, {'/'.join(map(str, sorted(steps)))}-step MLM head" if steps
            else f"`{model['teacher']}` teacher")


def teacher_loss(runs: list[dict]) -> float:
    """The teacher's final held-out loss, as the runs recorded it (the same blocks for every run of a study)."""
    return statistics.fmean(r["final"]["teacher_mlm_loss"] for r in runs) if runs else math.nan


def outgrew(a: dict[int, dict], b: dict[int, dict]) -> bool:
    """A student ends at or below the teacher's held-out loss (mean over seeds): the teacher is no longer the better
    model, and staying close to it — what HomoDistil buys — is worth nothing there."""
    t = teacher_loss([*a.values(), *b.values()])
    return any(seeds and statistics.fmean(metrics(r)["mlm"] for r in seeds.values()) <= t for seeds in (a, b))


def verdict(cells, budgets: list[int], sizes: list[float], rows: list[str]) -> list[str]:
    """One line per (T, sparsity, row) where the teacher stays ahead and ≥ 2 seeds finished: which of the row and
    (b) ends closer to the teacher (final held-out KL), with the paired 95% interval."""
    lines = []
    for t in budgets:
        for size in sizes:
            b = cells.get((t, size, BASELINE), {})
            for row in rows:
                a = cells.get((t, size, row), {})
                m, half, n = paired_runs(a, b, "kl")
                if n < 2 or half is None or outgrew(a, b):
                    continue
                who = ("**one-shot ahead**" if m - half > 0 else "**the row ahead**" if m + half < 0
                       else "no difference shown (the interval spans 0)")
                lines.append(f"- T = {t}, sparsity {size:g}, {row} − (b): KL {m:+.3f} "
                             f"[{m - half:+.3f}, {m + half:+.3f}], {n} seeds: {who}")
    return lines or ["- none yet: no row has ≥ 2 seeds of both students with the teacher still ahead"]

def paired_runs(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[float, float | None, int]:
    """:func:`mean_ci95` of ``key(a) - key(b)`` over the seeds both finished (seed -> run dicts)."""
    return mean_ci95([metrics(a[s])[key] - metrics(b[s])[key] for s in sorted(set(a) & set(b))
                      if metrics(a[s]).get(key) is not None and metrics(b[s]).get(key) is not None])


def diff_cell(m: float, half: float | None, digits: int, mark: bool = False) -> str:
    """``+m ± h``, h the half-width of the paired 95% interval; bold when ``mark`` and the interval excludes 0."""
    if math.isnan(m):
        return "–"
    text = f"{m:+.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")
    return f"**{text}**" if mark and half is not None and abs(m) > half else text


def swapped_cell(runs: dict[int, dict]) -> str:
    """``x% ± s (n)``: the share of (a)'s kept units the runs pruned instead (``run["swapped"]``), over seeds."""
    shares = [100 * r["swapped"]["units"] / r["swapped"]["kept"] for r in runs.values() if r.get("swapped")]
    return f"{fmt(*mean_std(shares), 1)}% ({len(shares)})" if shares else "–"


def by_budget(runs: list[dict]) -> dict[tuple[int, float, str], dict[int, dict]]:
    """(budget, size, variant) -> seed -> run."""
    cells: dict[tuple[int, float, str], dict[int, dict]] = {}
    for run in runs:
        cells.setdefault((run.get("budget"), run["size"], run["variant"]), {})[run["seed"]] = run
    return cells


def plot_budget_gap(cells, sizes: list[float], budgets: list[int], path: Path) -> Path:
    """(a) − (b) against T for final held-out KL and MLM loss: mean over seeds, error bar = the paired 95% interval;
    below 0, (a) is ahead."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("kl", "mlm")):
        for size in sizes:
            points = [(t, *paired_runs(cells.get((t, size, REFERENCE), {}), cells.get((t, size, BASELINE), {}), key))
                      for t in budgets]
            points = [(t, m, s or 0.0, n) for t, m, s, n in points if n]
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                            marker="o", capsize=3, label=f"sparsity {size:g}")
                for t, m, _, n in points:
                    ax.annotate(f"n={n}", (t, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0, color="black", lw=1)
        ax.set_xscale("log")
        ax.set(title=f"(a) HomoDistil − (b) one-shot: final held-out {'KL' if key == 'kl' else 'MLM loss'}",
               xlabel="total steps T", ylabel="nats / masked token (< 0: (a) ahead)")
    return _save(fig, axes, path)


def study_block(results: dict, figs: Path) -> str:
    """The budget study's sections (budget table and plot, ablation rows, downstream table, how to run)."""
    runs, teacher, floor = results["runs"], results.get("teacher"), results.get("floor") or {}
    cells = by_budget(runs)
    budgets, sizes = results["budgets"], sorted({r["size"] for r in runs} or
                                                {float(s) for s in results["sizes"].split(",")}, reverse=True)
    schedules, abl_t = results["schedules"], results.get("ablation_budget")
    score_keys = _ordered({k for r in runs for k in metrics(r)} - {*LOSSES, "acc"})
    root = results["root"]
    rows = [REFERENCE, *(v for v in results["variants"] if v not in (REFERENCE, BASELINE))]
    scored = {r["final"].get("scored_tokens") for r in runs}
    tokens = (f"{min(scored)} scored tokens per evaluation" if None not in scored and scored else
              f"{results['base']['evaluate']['heldout_blocks']} held-out blocks per evaluation (the scored-token "
              "count was not recorded)")
    lines = [f"<!-- study {root} -->",
             f"## Budget study, {teacher_label(results)}: (a) HomoDistil against (b) one-shot as the budget grows", "",
             f"_Generated by `homodistil.apps.compare_page` from `{results['root']}/results.json`: {len(runs)} of "
             f"{results['planned']} planned runs finished._", "",
             f"Every run: total steps T, t_f = {results['tf_ratio']:g}·T, t_i = "
             f"{results['base']['pruning']['t_i']}, masks as rarely as keeps every update within "
             f"{100 * results['max_drop']:g}% of each width (`pruning.schedule.largest_mask_interval`; where even "
             "a mask every step adds more, every step), ~10 held-out evaluations; the rest as the base config "
             f"`{results['config']}`. Held-out figures: {tokens}. Differences are paired by seed: mean ± the "
             "half-width of the 95% confidence interval of the per-seed differences (t-distribution).", ""]
    head = ["T", "sparsity", "row", "t_f", "mask every", "largest update", "teacher MLM", "(a) KL ↓", "(b) KL ↓",
            "(a) − (b) KL", "(a) MLM ↓", "(b) MLM ↓", "(a) − (b) MLM", "(a) − (b) masked acc", "(a) − (b) mean KL",
            "units (b) swapped", "seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from homodistil.pruning.schedule import update_drops  # noqa: PLC0415

    for t in budgets:
        for size in sizes:
            b = cells.get((t, size, BASELINE), {})
            for name in rows:
                a, sch = cells.get((t, size, name), {}), schedules.get(f"{t}/{name}/{size:g}")
                if sch is None:
                    continue
                drop = max(update_drops(sch["t_i"], sch["t_f"], size, sch["mask_interval"]))
                both = [*a.values(), *b.values()]
                t_mlm = (f"{teacher_loss(both):.3f}" + (" **outgrown**" if outgrew(a, b) else "")) if both else "–"
                row = [str(t), f"{size:g}", name if name != REFERENCE else "(a)", str(sch["t_f"]),
                       str(sch["mask_interval"]), f"{100 * drop:.1f}%", t_mlm]
                for key in ("kl", "mlm"):
                    row += [fmt(*mean_std([metrics(r)[key] for r in a.values()]), 3),
                            fmt(*mean_std([metrics(r)[key] for r in b.values()]), 3),
                            diff_cell(*paired_runs(a, b, key)[:2], 3, mark=True)]
                row += [diff_cell(*paired_runs(a, b, "acc")[:2], 2, mark=True),
                        diff_cell(*paired_runs(a, b, "kl_avg")[:2], 3, mark=True), swapped_cell(b)]
                lines.append("| " + " | ".join(row) + f" | {min(len(a), len(b))} |")
    lines += ["", "Row: (a) HomoDistil, or the named variant of it, against (b) one-shot at the same T; its columns "
              "headed (a) are that row's. Teacher MLM: the teacher's held-out MLM loss on the same blocks; "
              "**outgrown** where a student ends at or below it (mean over seeds): there the MLM term has pulled "
              "the students past a weaker teacher, staying close to it is worth nothing, and the row does not "
              "count for the verdict. "
              "Bold: the paired 95% interval excludes 0. Largest update: the most sparsity one mask "
              "update adds (a fraction of each width; a head of 32 units loses at least 1/32 per update that "
              "touches it). Masked acc: held-out masked-token accuracy, in points (> 0: (a) ahead). Mean KL: "
              "held-out KL averaged over the run's evaluations, step 0 included (how close each student stays to the teacher on the way). Units (b) swapped: of the teacher units (a) "
              "kept, the share (b) pruned instead (see the ablation table).", ""]
    lines += ["**Verdict** (final held-out KL; only rows with the teacher still ahead and ≥ 2 seeds):", "",
              *verdict(cells, budgets, sizes, rows), ""]
    if any(n for t in budgets for size in sizes
           for *_, n in [paired_runs(cells.get((t, size, REFERENCE), {}), cells.get((t, size, BASELINE), {}), "kl")]):
        name = "budget_gap.png" if root == LEGACY_ROOT else f"budget_gap_{Path(root).name}.png"
        path = plot_budget_gap(cells, sizes, budgets, figs / name)
        lines += [f"![(a) − (b) against the budget]({figs.name}/{path.name})", ""]
    else:
        lines += ["_No plot yet: no budget has both (a) and (b) finished._", ""]
    if results.get("ablations"):
        lines += [f"### Ablations at T = {abl_t}", ""]
        lines += [f"- **{name}** — {desc}" for name, desc in results["ablations"].items()]
        head = ["row", "sparsity", "KL ↓", "MLM ↓", "− (a) KL", "− (b) KL", "− (a) MLM", "− (b) MLM",
                "units swapped vs (a)", "seeds"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in [REFERENCE, BASELINE, *results["ablations"]]:
            for size in sizes:
                row_runs = cells.get((abl_t, size, name), {})
                ref, base = cells.get((abl_t, size, REFERENCE), {}), cells.get((abl_t, size, BASELINE), {})
                row = [name, f"{size:g}", fmt(*mean_std([metrics(r)["kl"] for r in row_runs.values()]), 3),
                       fmt(*mean_std([metrics(r)["mlm"] for r in row_runs.values()]), 3)]
                row += [diff_cell(*paired_runs(row_runs, other, key)[:2], 3, mark=True) if other is not row_runs
                        else "0" for key in ("kl", "mlm") for other in (ref, base)]
                lines.append("| " + " | ".join(row) + f" | {swapped_cell(row_runs)} | {len(row_runs)} |")
        lines += ["", "− (a) / − (b): the row minus (a) HomoDistil / (b) one-shot at the same T, paired by seed "
                  "(< 0: the row is ahead), ± the paired 95% interval; bold where it excludes 0. Units swapped: of the "
                  "teacher units (a) kept, the share this row pruned (keeping as many others), from both runs' "
                  "`export/kept_units.json`; mean ± std over the seeds that have both (n), – where none has.", ""]
    lines += ["### Downstream", ""]
    e = results["base"]["evaluate"]
    cap = lambda n: "whole split" if n is None else f"at most {n}"  # noqa: E731
    tuned = results.get("finetune_budgets")
    at = "every run" if tuned is None else ("the runs at T = " + ", ".join(map(str, tuned)) if tuned else "no run")
    lines += [f"Linear probe on {', '.join(e['tasks'])} for every run; fine-tuning ({at}, after every distillation "
              f"of the sweep) on {', '.join(e['finetune_tasks'] or e['tasks'])}: {e['epochs']} epochs, lr {e['lr']}, "
              "training "
              f"examples {cap(e['max_train'])}, validation {cap(e['max_eval'])}, max length {e['max_length']}. "
              "The teacher is evaluated under the same settings; the floor is always answering the training "
              "split's most common label. (a) − (b): paired by seed, ± the 95% interval, bold where it excludes 0.", ""]
    head = ["T", "sparsity", "row", *(k + " ↑" for k in score_keys), "seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher:
        t_scores = {**{f"probe {t}": v for t, v in teacher["probe"].items()},
                    **{f"ft {t}": v for t, v in teacher["finetune"].items()}}
        lines.append("| – | 0 | **teacher** | " + " | ".join(
            fmt(t_scores[k], None, 1) if t_scores.get(k) is not None else "–" for k in score_keys) + " | – |")
    if floor:
        lines.append("| – | – | majority class | " + " | ".join(
            fmt(floor[k.split(" ", 1)[1]], None, 1) if k.split(" ", 1)[1] in floor else "–" for k in score_keys)
            + " | – |")
    for t in budgets:
        for size in sizes:
            a, b = cells.get((t, size, REFERENCE), {}), cells.get((t, size, BASELINE), {})
            for name, seeds in ((REFERENCE, a), (BASELINE, b)):
                if seeds:
                    lines.append(f"| {t} | {size:g} | {name} | " + " | ".join(
                        fmt(*mean_std([metrics(r).get(k) for r in seeds.values()]), 1) for k in score_keys)
                        + f" | {len(seeds)} |")
            if a and b:
                lines.append(f"| {t} | {size:g} | (a) − (b) | " + " | ".join(
                    diff_cell(*paired_runs(a, b, k)[:2], 1, mark=True) for k in score_keys)
                    + f" | {min(len(a), len(b))} |")
    wall = [r["wall_s"] for r in runs]
    steps = sum(r["budget"] for r in results["plan"])
    n_tuned = 1 + sum(tuned is None or r["budget"] in tuned for r in results["plan"])  # + the teacher
    ft_steps = _finetune_steps(results["base"]["evaluate"], results.get("floor_sizes") or {})
    lines += ["", "### How to run", "", "```bash", results["command"], "```", "",
              f"Estimated compute on the 2-core CPU machines, 2 runs at a time: distillation ≈ "
              f"{steps * TRAIN_S_PER_STEP / 2 / 3600:.1f} h ({steps} steps over {len(results['plan'])} runs at "
              f"~{TRAIN_S_PER_STEP} s per step per run, from a pair of T = 1000 runs taking ~25 min); "
              + (f"fine-tuning ≈ {n_tuned * ft_steps * FINETUNE_S_PER_STEP / 2 / 3600:.1f} h more "
                 f"({n_tuned} models, the teacher's included, {ft_steps} fine-tuning steps each at up to "
                 f"{FINETUNE_S_PER_STEP} s, the teacher's size)."
                 if ft_steps else "fine-tuning not yet sized (no finished run)."), "",
              f"{results['jobs']} run(s) at a time"
              + (f"; {sum(wall) / 60:.0f} run-minutes over {len(runs)} finished runs" if wall else "; no run "
                 "finished yet") + finetune_minutes(runs, teacher) + ".", f"<!-- /study {root} -->"]
    return "\n".join(lines)


TRAIN_S_PER_STEP = 1.5  # s per distillation step per run, 2 runs at a time (docs: a T = 1000 pair took ~25 min)
FINETUNE_S_PER_STEP = 1.7  # s per fine-tuning step (batch 32 × 64 tokens) of the MiniLM teacher on 1 thread, 2 jobs
# on the 2-core machine: its rt-polarity fine-tuning, 894 steps in 1540 s (runs/budget/teacher/eval/finetune)


def finetune_minutes(runs: list[dict], teacher: dict | None) -> str:
    """The measured fine-tuning time (``finetune_s`` of each result.json), as a clause of the compute line."""
    took = [r["finetune_s"] for r in runs if "finetune_s" in r]
    t = (teacher or {}).get("finetune_s")
    if not took and t is None:
        return ""
    return (f"; fine-tuning {(sum(took) + (t or 0)) / 60:.0f} model-minutes over {len(took)} runs"
            + (f" and the teacher (the teacher's {t / 60:.0f})" if t is not None else ""))


def _finetune_steps(e: dict, train_sizes: dict[str, int]) -> int:
    """Fine-tuning steps per run: Σ over the fine-tuned tasks of ceil(train examples / batch) · epochs (a record
    older than the batch's entry ran at 32, the preset's batch then)."""
    tasks, batch = e["finetune_tasks"] or e["tasks"], e.get("batch_size", 32)
    sizes = [min(train_sizes[t], e["max_train"] or train_sizes[t]) for t in tasks if t in train_sizes]
    return sum(-(-n // batch) * e["epochs"] for n in sizes) if len(sizes) == len(tasks) else 0


def write_study(results: dict, page: Path) -> Path:
    """Put the study's sections into ``page``: replace its study block, or add one after the first section (a
    page that does not exist yet gets the block alone). The rest of the page is left as it is."""
    page = Path(page)
    figs = page.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    block = study_block(results, figs)
    if not page.exists():
        page.write_text("# HomoDistil against its alternatives\n\n" + block + "\n")
        return page
    text = page.read_text()
    mine, other = study_pattern(results["root"]).search(text), STUDY.search(text)
    if mine:
        text = text[:mine.start()] + block + text[mine.end():]
    elif other:  # a newer study goes above the older ones
        text = text[:other.start()] + block + "\n\n" + text[other.start():]
    else:
        first = text.find("\n## ")
        text = text[:first + 1] + block + "\n\n" + text[first + 1:] if first >= 0 else text + "\n" + block + "\n"
    page.write_text(text)
    return page


def main(argv: list[str] | None = None) -> int:
    """``python -m homodistil.apps.compare_page RESULTS_JSON [PAGE]``: rewrite a study's (or a sweep's) sections of
    the page from its committed ``results.json`` alone, without its run directories."""
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m homodistil.apps.compare_page", description=main.__doc__)
    p.add_argument("results", help="a sweep's results.json (homodistil compare writes ROOT/results.json)")
    p.add_argument("page", nargs="?", default="docs/results.md")
    args = p.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    page = (write_study if results.get("budgets") else write_page)(results, Path(args.page))
    print(f"page: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
