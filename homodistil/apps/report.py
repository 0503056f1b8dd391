"""The run report: plots of the training curves and a markdown page with the results.

Reads only files a run writes (``metrics.jsonl``, the evaluation JSON/markdown), so it can
be regenerated at any time: ``homodistil report RUN_DIR``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .decoder_eval import DECODER_MD

LOSS_TERMS = ("total", "lm", "kl", "hidden", "attention")


class ReportError(ValueError):
    """The run directory has nothing to report on (printed as one line)."""


def _rows(run_dir: Path) -> list[dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites steps after its checkpoint: keep the last
    return [rows[s] for s in sorted(rows)]


def plot_training(run_dir: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = _rows(run_dir)
    steps = [r["step"] for r in rows]
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for term in LOSS_TERMS:
        key = f"loss/{term}"
        if key in rows[0]:
            axes[0 if term in ("total", "lm") else 1].plot(steps, [r[key] for r in rows], label=term)
    axes[0].set(title="MLM and total loss", xlabel="step")
    axes[1].set(title="distillation terms", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "losses.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [r["prune/sparsity"] for r in rows], color="tab:red", label="target sparsity")
    ax.set(xlabel="step", ylabel="sparsity", ylim=(0, 1))
    twin = ax.twinx()
    twin.plot(steps, [r["prune/live_params"] / 1e6 for r in rows], color="tab:blue", label="live parameters")
    twin.set(ylabel="live parameters (M)")
    ax.set_title("cubic schedule and student size")
    fig.legend(loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.92))
    fig.tight_layout()
    out.append(run_dir / "sparsity.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def plot_perf(run_dir: Path) -> list[Path]:
    """throughput.png: tokens/s and step time over steps against live parameters; phases.png:
    where each step's time went, as stacked areas (the perf/* scalars, docs/profiling.md)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in _rows(run_dir) if "perf/step_s" in r]  # written every trainer.perf_every steps
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "perf/tokens_per_s", "tokens/s"), (axes[1], "perf/step_s", "step time (s)")):
        ax.plot(steps, [r[key] for r in rows], color="tab:green", label=label)
        ax.set(xlabel="step", ylabel=label, title=f"{label} and student size")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(steps, [r["prune/live_params"] / 1e6 for r in rows], color="tab:blue", label="live parameters")
        twin.set(ylabel="live parameters (M)")
    fig.tight_layout()
    out = [run_dir / "throughput.png"]
    fig.savefig(out[0], dpi=110)
    plt.close(fig)

    phases = [k for k in rows[0] if k.startswith("perf/phase/") and any(r.get(k, 0) > 0 for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(steps, [[max(0.0, r.get(k, 0.0)) for r in rows] for k in phases],
                 labels=[k.removeprefix("perf/phase/") for k in phases], colors=plt.cm.tab20.colors[:len(phases)])
    ax.set(xlabel="step", ylabel="seconds per step", title="where each step's time goes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "phases.png")
    fig.savefig(out[1], dpi=110)
    plt.close(fig)
    return out


def plot_scores(results: dict, path: Path) -> Path | None:
    """Teacher vs student bars per task (fine-tuned and probe main scores)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = results.get("models", {})
    bars = []  # (label, {model: score})
    for task in results.get("tasks", {}):
        for kind in ("finetune", "probe"):
            scores = {m: r.get("tasks", {}).get(task, {}).get(kind, {}) for m, r in models.items()}
            scores = {m: s.get("main") for m, s in scores.items() if isinstance(s, dict) and s.get("main") is not None}
            if scores:
                bars.append((f"{task}\n{kind}", scores))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4))
    names = list(models)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(bars))], [b[1].get(name, 0) for b in bars], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(bars))], [b[0] for b in bars])
    ax.set(ylabel="score (0-100)", title="teacher vs student")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, eval_dir: str | Path | None = None, heldout: dict | None = None,
                 notes: list[str] | None = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run logged no step yet)")
    rows = _rows(run_dir)
    if not rows:
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: no steps logged yet")
    first, last = rows[0], rows[-1]
    lines = ["# homodistil run report", "", f"Run: `{run_dir}`", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += [f"- steps: {last['step']}; student parameters {first['prune/live_params'] / 1e6:.2f}M -> "
              f"{last['prune/live_params'] / 1e6:.2f}M; final sparsity {last['prune/sparsity']:.2f}",
              "- final losses: " + ", ".join(f"{t} {last[f'loss/{t}']:.4f}" for t in LOSS_TERMS if f"loss/{t}" in last),
              "", "![losses](losses.png)", "", "![sparsity](sparsity.png)", ""]
    plot_training(run_dir)
    if plot_perf(run_dir):
        perf = [r for r in rows if "perf/tokens_per_s" in r]
        mfu = f", MFU {perf[-1]['perf/mfu']:.1%}" if "perf/mfu" in perf[-1] else ""
        lines += ["## Throughput", "",
                  f"- tokens/s {perf[0]['perf/tokens_per_s']:.0f} at step {perf[0]['step']} -> "
                  f"{perf[-1]['perf/tokens_per_s']:.0f} at step {perf[-1]['step']}; {perf[-1]['perf/tflops']:.3g} "
                  f"TFLOP/s per device{mfu} (docs/profiling.md)", "",
                  "![throughput](throughput.png)", "", "![phases](phases.png)", ""]
    if heldout:
        lines += ["## Held-out text", "", "| model | MLM loss | masked-token accuracy | KL(teacher ‖ model) |",
                  "|---|---|---|---|"]
        lines += [f"| {m} | {v['mlm_loss']:.3f} | {100 * v['masked_accuracy']:.1f}% | {v['kl_to_teacher']:.3f} |"
                  for m, v in heldout.items()]
        lines.append("")
    if eval_dir is not None and (Path(eval_dir) / DECODER_MD).is_file():  # a causal LM: homodistil evaluate's figures
        lines += ["## Held-out text, latency and greedy continuations", "",
                  (Path(eval_dir) / DECODER_MD).read_text().strip(), ""]
    if eval_dir is not None and (Path(eval_dir) / "eval_results.json").is_file():
        eval_dir = Path(eval_dir)
        results = json.loads((eval_dir / "eval_results.json").read_text())
        lines += ["## Downstream tasks", "", (eval_dir / "eval_results.md").read_text().strip(), ""]
        if plot_scores(results, run_dir / "scores.png"):
            lines += ["![scores](scores.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
