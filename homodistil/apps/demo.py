"""``homodistil demo``: distill -> export -> held-out KL/MLM loss -> downstream evaluation ->
a report with plots, on the embedded default (``configs/demo.yaml``) or any config."""
from __future__ import annotations

import time

from homodistil.apps.report import write_report
from homodistil.config import load_config
from homodistil.data.corpora import EMBEDDED, corpus_licences
from homodistil.engine.recipe import distill
from homodistil.eval.heldout import heldout_metrics
from homodistil.eval.report import EvalSettings, evaluate_main
from homodistil.eval.tasks import require_tasks


def demo_main(config: str | None, overrides: list[str]) -> int:
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    require_tasks(cfg.evaluate.tasks)  # a missing download fails now, not after the distillation
    recipe = distill(cfg)
    out, e = recipe.out, cfg.evaluate
    student = str(out / "export")
    print("measuring held-out MLM loss, masked-token accuracy and teacher-student KL ...", flush=True)
    heldout = heldout_metrics({"student": student}, recipe.teacher_dir, recipe.data, max_blocks=e.heldout_blocks,
                              objective=recipe.objective)
    extra = {name: {"held-out MLM loss": v["mlm_loss"], "masked acc %": 100 * v["masked_accuracy"],
                    "KL(T||model)": v["kl_to_teacher"]}
             for name, v in heldout.items()}
    evaluate_main({"student": student}, e.tasks, out / "eval", teacher=recipe.teacher_dir,
                  extra_metrics=lambda name, _dir: extra.get(name, {}), print_table=False,
                  settings=EvalSettings.from_config(e, progress=cfg.trainer.progress))
    minutes = (time.perf_counter() - started) / 60
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else list(cfg.data.source)
    sources = [n for s in sources for n in (EMBEDDED if s == "embedded" else [s])]
    licences = [f"text `{n}`: {corpus_licences()[n]}" for n in sources if n in corpus_licences()]
    report = write_report(out, out / "eval", heldout, notes=[f"wall time of `homodistil demo`: {minutes:.1f} min",
                                                             f"teacher: {recipe.teacher_dir}", *licences])
    print((out / "eval" / "eval_results.md").read_text())
    print(f"report: {report} ({minutes:.1f} min)")
    return 0
