"""``homodistil evaluate RUN/export ... [--teacher DIR]`` for causal-LM exports: the decoder figures
of :mod:`homodistil.eval.decoder` on the held-out text of the run that wrote the first export
(its ``config.yaml`` beside ``export/``), written to ``RUN/eval`` for ``homodistil report``.

``python -m homodistil.apps.decoder_eval --study ROOT [--page PAGE]`` gathers the pairs of
``scripts/smollm2_runs.sh`` (``ROOT/{homodistil,oneshot}/seedS``, each pair evaluated together)
into one table per seed and the paired differences (a) − (b) with their 95% intervals over seeds.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from homodistil.config import ConfigError, load_config

DECODER_JSON, DECODER_MD = "decoder_results.json", "decoder_results.md"


def is_causal_export(path: str) -> bool:
    """Whether an exported model directory holds a causal LM (``*ForCausalLM`` / ``*LMHeadModel``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _names(exports: list[Path]) -> list[str]:
    """A run's export is named by its run directory (runs/smollm2/export -> smollm2), with its parent
    too where that alone would repeat (runs/study/homodistil/seed0 -> homodistil/seed0)."""
    runs = [e.parent if e.name == "export" else e for e in exports]
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [f"{r.parent.name}/{r.name}" for r in runs]


def decoder_evaluate_main(model_dirs: list[str], teacher: str | None, out: str | None) -> Path:
    """Evaluate the exports (and the teacher: ``teacher``, else the run's own); returns the markdown file."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from homodistil.data.batches import from_config  # noqa: PLC0415
    from homodistil.engine.models import teacher_source  # noqa: PLC0415
    from homodistil.eval.decoder import decoder_metrics, render_markdown  # noqa: PLC0415

    exports = [Path(p) for p in model_dirs]
    run_config = exports[0].parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(f"{exports[0]}: a causal-LM export is evaluated on its run's held-out text, but "
                          f"{run_config} is missing: give the export/ folder of a run directory")
    cfg = load_config(run_config)
    teacher = teacher or teacher_source(cfg.model) or str(exports[0].parent / "teacher")  # a tiny one: the run saved it
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    d = cfg.data
    data = from_config(d, tokenizer, seed=cfg.trainer.seed, objective="causal",
                       cache_dir=Path(d.cache_dir) if d.cache_dir else exports[0].parent / "cache",
                       heldout_blocks=cfg.evaluate.heldout_blocks)
    results = decoder_metrics(dict(zip(_names(exports), map(str, exports))), str(teacher), data,
                              max_blocks=cfg.evaluate.heldout_blocks)
    out_dir = Path(out) if out else exports[0].parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DECODER_JSON).write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / DECODER_MD).write_text(render_markdown(results))
    return out_dir / DECODER_MD


# ------------------------------------------------------------------------------ (a) vs (b) over seeds
VARIANTS = ("homodistil", "oneshot")  # (a), (b): the directories scripts/smollm2_runs.sh writes


def study_pairs(root: Path) -> dict[int, dict[str, dict]]:
    """seed -> {"teacher", "homodistil", "oneshot"} records of every seed whose pair was evaluated,
    each student's with its run's ``wall_seconds``."""
    pairs = {}
    for path in sorted((root / VARIANTS[0]).glob("seed*/eval/" + DECODER_JSON)):
        seed = int(path.parent.parent.name.removeprefix("seed"))
        results = json.loads(path.read_text())
        pair = {"teacher": results["teacher"]}
        for variant in VARIANTS:
            run = root / variant / f"seed{seed}"
            pair[variant] = {**results[f"{variant}/seed{seed}"],
                             "wall_seconds": float((run / "wall_seconds").read_text())}
        pairs[seed] = pair
    return pairs


def study_markdown(root: Path) -> str:
    """Per seed: teacher, (a) and (b) perplexity, KL and wall time; then (a) − (b) in nats (NLL and
    KL), each with its paired 95% interval (bold where it excludes 0)."""
    from homodistil.apps.compare_page import diff_cell, mean_ci95  # noqa: PLC0415 (scipy)

    pairs = study_pairs(root)
    lines = [f"<!-- decoder study {root} -->",
             f"Made by `scripts/smollm2_runs.sh {root}` (table: `python -m homodistil.apps.decoder_eval "
             f"--study {root} --page PAGE`).", "",
             "| seed | teacher ppl | (a) HomoDistil ppl | (b) one-shot ppl | (a) KL | (b) KL | scored tokens "
             "| (a) wall | (b) wall |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, p in pairs.items():
        t, a, b = p["teacher"], p["homodistil"], p["oneshot"]
        lines.append(f"| {seed} | {t['perplexity']:.2f} | {a['perplexity']:.2f} | {b['perplexity']:.2f} | "
                     f"{a['kl_to_teacher']:.3f} | {b['kl_to_teacher']:.3f} | {a['scored_tokens']} | "
                     f"{a['wall_seconds'] / 60:.1f} min | {b['wall_seconds'] / 60:.1f} min |")
    first = pairs[min(pairs)] if pairs else None
    if first:  # the widths are the seeds' and the variants' alike; latency is seed 0's (the models' shapes decide it)
        lat = {k: first[k]["latency"] for k in ("teacher", *VARIANTS)}
        lines += ["", f"Parameters (non-embedding): teacher {first['teacher']['params']['total'] / 1e6:.1f}M "
                  f"({first['teacher']['params']['non_embedding'] / 1e6:.1f}M), each student "
                  f"{first['homodistil']['params']['total'] / 1e6:.1f}M "
                  f"({first['homodistil']['params']['non_embedding'] / 1e6:.1f}M). CPU latency of a forward at batch "
                  f"{lat['teacher']['batch_size']} x {lat['teacher']['seq_len']} ({lat['teacher']['threads']} threads, "
                  f"median of {lat['teacher']['repeats']}, seed {min(pairs)}'s evaluation): teacher "
                  f"{lat['teacher']['median_ms']:.0f} ms, (a) {lat['homodistil']['median_ms']:.0f} ms, "
                  f"(b) {lat['oneshot']['median_ms']:.0f} ms."]
    lines += ["", "| (a) − (b), paired over seeds | mean ± 95% interval (nats per token) | seeds |", "|---|---|---|"]
    for key, label in (("nll", "held-out NLL (log perplexity)"), ("kl_to_teacher", "KL(teacher ‖ student)")):
        m, half, n = mean_ci95([p["homodistil"][key] - p["oneshot"][key] for p in pairs.values()])
        lines.append(f"| {label} | {diff_cell(m, half, 3, mark=True) if n else '–'} | {n} |")
    return "\n".join(lines + [f"<!-- /decoder study {root} -->"]) + "\n"


def write_study(root: Path, page: Path) -> None:
    """Replace the study's block on ``page`` (or append it)."""
    block = study_markdown(root)
    text = page.read_text() if page.is_file() else ""
    pattern = re.compile(rf"<!-- decoder study {re.escape(str(root))} -->.*?<!-- /decoder study "
                         rf"{re.escape(str(root))} -->\n", re.S)
    page.write_text(pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m homodistil.apps.decoder_eval", description=__doc__.split("\n\n")[1])
    p.add_argument("--study", required=True, help="ROOT of scripts/smollm2_runs.sh")
    p.add_argument("--page", help="markdown page whose block for ROOT is replaced (default: print the table)")
    args = p.parse_args(argv)
    root = Path(args.study)
    if not study_pairs(root):
        print(f"decoder_eval: error: {root}: no evaluated pair (homodistil/seedS/eval/{DECODER_JSON})", file=sys.stderr)
        return 2
    if args.page:
        write_study(root, Path(args.page))
    else:
        print(study_markdown(root), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
