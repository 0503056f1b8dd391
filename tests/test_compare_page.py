"""The budget study's page from hand-made results: paired 95% intervals, the teacher's loss, "outgrown" rows kept
out of the verdict, and several studies on one page."""
from __future__ import annotations

import math

import pytest

from homodistil.apps.compare_page import STUDY, mean_ci95, outgrew, verdict, write_study

TEACHER_MLM = 4.0


def _run(budget: int, variant: str, seed: int, kl: float, mlm: float) -> dict:
    final = {"step": budget, "kl": kl, "mlm_loss": mlm, "masked_accuracy": 0.3, "teacher_mlm_loss": TEACHER_MLM,
             "scored_tokens": 10_080}
    return {"budget": budget, "size": 0.5, "variant": variant, "seed": seed, "heldout": [final], "final": final,
            "probe": {}, "finetune": {}, "wall_s": 60.0, "swapped": None,
            "teacher": {"source": "minilm", "prepare": {"steps": 4000}}}


def _results(root: str) -> dict:
    # T = 100: (a) behind (b) by 0.1, 0.2, 0.3 nats (mean 0.2, sd 0.1); the t_f = 0.25·T row ties with (b)
    # (differences -0.1, 0, +0.1); T = 200: students below the teacher's loss (outgrown), (a) far ahead
    runs = []
    for seed, d in enumerate((0.1, 0.2, 0.3)):
        runs += [_run(100, "oneshot", seed, 0.5, 4.5), _run(100, "homodistil", seed, 0.5 + d, 4.5 + d),
                 _run(100, "tf0.25", seed, 0.5 + d - 0.15, 4.5), _run(200, "oneshot", seed, 0.5, 3.9),
                 _run(200, "homodistil", seed, 0.5 - d, 3.9)]
    schedule = {"t_i": 5, "t_f": 50, "mask_interval": 2, "max_steps": 100}
    return {"root": root, "runs": runs, "planned": len(runs), "budgets": [100, 200], "sizes": "0.5",
            "variants": {"homodistil": "(a)", "oneshot": "(b)", "tf0.25": "(a) t_f = 0.25·T"},
            "schedules": {f"{t}/{v}/0.5": schedule for t in (100, 200) for v in ("homodistil", "oneshot", "tf0.25")},
            "ablation_budget": None, "ablations": {}, "tf_ratio": 0.5, "max_drop": 0.02, "config": "c.yaml",
            "base": {"model": {"teacher": "minilm", "prepare": {"steps": 4000}}, "pruning": {"t_i": 5},
                     "evaluate": {"heldout_blocks": 1100, "tasks": [], "finetune_tasks": [], "epochs": 1,
                                  "lr": 1e-4, "max_train": None, "max_eval": None, "max_length": 64}},
            "teacher": None, "floor": {}, "finetune_budgets": [], "jobs": 2, "command": "homodistil compare c.yaml",
            "plan": [{"budget": r["budget"]} for r in runs]}


def test_mean_ci95_is_students_t_interval():
    m, half, n = mean_ci95([0.1, 0.2, 0.3])
    assert (m, n) == (pytest.approx(0.2), 3)
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t(0.975, 2) · sd / √n
    assert mean_ci95([0.5])[1] is None  # one seed: no interval


def test_outgrown_rows_are_flagged_and_left_out_of_the_verdict(tmp_path):
    results = _results("runs/strong")
    from homodistil.apps.compare_page import by_budget  # noqa: PLC0415

    cells = by_budget(results["runs"])
    assert not outgrew(cells[(100, 0.5, "homodistil")], cells[(100, 0.5, "oneshot")])
    assert outgrew(cells[(200, 0.5, "homodistil")], cells[(200, 0.5, "oneshot")])  # 3.9 <= 4.0
    lines = verdict(cells, [100, 200], [0.5], ["homodistil", "tf0.25"])
    assert lines == ["- T = 100, sparsity 0.5, homodistil − (b): KL +0.200 [-0.048, +0.448], 3 seeds: "
                     "no difference shown (the interval spans 0)",
                     "- T = 100, sparsity 0.5, tf0.25 − (b): KL +0.050 [-0.198, +0.298], 3 seeds: "
                     "no difference shown (the interval spans 0)"]
    page = write_study(results, tmp_path / "results.md")
    text = page.read_text()
    assert "| 200 | 0.5 | (a) | 50 | 2 |" in text and "| 4.000 **outgrown** |" in text
    assert "| 100 | 0.5 | tf0.25 |" in text and "10080 scored tokens per evaluation" in text
    assert "`minilm` teacher, 4000-step MLM head" in text


def test_an_interval_that_excludes_zero_is_bold_and_names_the_winner():
    results = _results("runs/strong")
    for r in results["runs"]:
        if r["budget"] == 100 and r["variant"] == "homodistil":
            r["final"]["kl"] = 0.5 + 0.2 + 0.01 * r["seed"]  # differences 0.20, 0.21, 0.22
    from homodistil.apps.compare_page import by_budget, diff_cell, paired_runs  # noqa: PLC0415

    cells = by_budget(results["runs"])
    m, half, _ = paired_runs(cells[(100, 0.5, "homodistil")], cells[(100, 0.5, "oneshot")], "kl")
    assert diff_cell(m, half, 3, mark=True) == "**+0.210 ± 0.025**"
    assert "one-shot ahead" in verdict(cells, [100], [0.5], ["homodistil"])[0]


def test_two_studies_share_a_page_and_each_replaces_only_its_own(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Title\n\n<!-- study -->\nold weak-teacher block\n<!-- /study -->\n\n## Other\n")
    write_study(_results("runs/budget"), page)  # the legacy unnamed block is runs/budget's: replaced
    write_study(_results("runs/strong"), page)  # a new study goes above the older one
    text = page.read_text()
    assert "old weak-teacher block" not in text and text.endswith("## Other\n")
    assert [m.group(1) for m in STUDY.finditer(text)] == [" runs/strong", " runs/budget"]
    write_study(_results("runs/strong"), page)
    assert [m.group(1) for m in STUDY.finditer(page.read_text())] == [" runs/strong", " runs/budget"]
