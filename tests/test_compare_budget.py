"""`homodistil compare --budgets`: (a) and (b) at several total budgets plus an ablation row, on the tiny config."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from homodistil.apps.compare import build_parser, compare_main, run_dir, swapped_units, sweep_plan
from homodistil.apps.compare_page import STUDY, finetune_minutes, write_page
from homodistil.config import ConfigError
from homodistil.engine.export import KEPT_UNITS
from homodistil.eval.tasks import load_task
from homodistil.pruning.schedule import largest_mask_interval

from conftest import TINY
from recipe_runs import REPO

SIZE, SEED = 0.5, 3
ARGS = [*TINY, "pruning.t_i=1", "pruning.metric=sensitivity", "pruning.calibration_steps=2",
        "trainer.eval_every=2", "evaluate.heldout_blocks=8", "evaluate.tasks=[rt-polarity]", "evaluate.max_train=48",
        "evaluate.max_eval=24"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    argv = [str(REPO / "configs" / "tiny.yaml"), *ARGS, "--sizes", str(SIZE), "--seeds", str(SEED),
            "--variants", "homodistil,oneshot", "--budgets", "6,8", "--ablations", "platon-window",
            "--ablation-budget", "8", "--finetune-budgets", "8", "--max-drop", "0.4", "--out", str(root / "runs"), "--page", str(root / "docs" / "results.md")]
    assert compare_main(argv) == 0
    return root, argv


def _cfg(root, variant, budget):
    return yaml.safe_load((run_dir(root / "runs", SIZE, variant, SEED, budget) / "config.yaml").read_text())


def test_each_budget_gets_its_schedule_and_the_row_its_keys(study):
    root, _ = study
    for budget in (6, 8):
        t_f = round(0.5 * budget)
        mask = largest_mask_interval(1, t_f, SIZE, 0.4)
        for variant in ("homodistil", "oneshot"):
            cfg = _cfg(root, variant, budget)
            assert cfg["trainer"]["max_steps"] == budget and cfg["pruning"]["t_f"] == t_f
            assert cfg["pruning"]["mask_interval"] == mask and cfg["trainer"]["eval_every"] == max(1, budget // 10)
        assert _cfg(root, "oneshot", budget)["pruning"]["schedule"] == "oneshot"
    row = _cfg(root, "platon-window", 8)
    assert row["pruning"]["metric"] == "platon" and row["pruning"]["platon_window"] == row["pruning"]["mask_interval"]
    assert {k: v for k, v in row["pruning"].items() if k not in ("metric", "platon_window")} == \
        {k: v for k, v in _cfg(root, "homodistil", 8)["pruning"].items() if k not in ("metric", "platon_window")}
    result = json.loads((run_dir(root / "runs", SIZE, "homodistil", SEED, 8) / "result.json").read_text())
    assert [r["step"] for r in result["heldout"]] == list(range(0, 9))  # eval_every 1 at T=8, step 0 included


def test_results_hold_the_study_and_the_majority_floor(study):
    root, _ = study
    results = json.loads((root / "runs" / "results.json").read_text())
    assert results["budgets"] == [6, 8] and results["planned"] == 5 and len(results["runs"]) == 5
    assert {(r["budget"], r["variant"]) for r in results["runs"]} == {
        (6, "homodistil"), (6, "oneshot"), (8, "homodistil"), (8, "oneshot"), (8, "platon-window")}
    data = load_task("rt-polarity", max_train=48, max_eval=24)
    top = Counter(data.train["label"]).most_common(1)[0][0]
    labels = data.evals["validation"]["label"]
    acc = sum(y == top for y in labels) / len(labels)
    f1 = 2 * acc / (1 + acc) if top == 1 else 0.0  # all predicted positive: precision = acc, recall = 1
    assert results["floor"]["rt-polarity"] == pytest.approx(100 * (acc + f1) / 2)


def test_budget_row_has_masked_accuracy_and_the_mean_kl_over_the_run(study):
    root, _ = study
    results = json.loads((root / "runs" / "results.json").read_text())
    runs = {r["variant"]: r for r in results["runs"] if r["budget"] == 8}
    mean_kl = {v: sum(h["kl"] for h in runs[v]["heldout"]) / len(runs[v]["heldout"]) for v in ("homodistil", "oneshot")}
    acc = {v: 100 * runs[v]["final"]["masked_accuracy"] for v in ("homodistil", "oneshot")}
    row = next(line for line in (root / "docs" / "results.md").read_text().splitlines() if line.startswith("| 8 | 0.5 |"))
    assert row.split(" | ")[-4:-2] == [f"{acc['homodistil'] - acc['oneshot']:+.2f}",
                                       f"{mean_kl['homodistil'] - mean_kl['oneshot']:+.3f}"]


def test_units_swapped_against_a_from_the_exports(study, tmp_path):
    root, _ = study
    results = json.loads((root / "runs" / "results.json").read_text())
    swapped = {(r["budget"], r["variant"]): r["swapped"] for r in results["runs"]}
    assert swapped[(8, "homodistil")] is None and swapped[(6, "homodistil")] is None
    kept = json.loads((run_dir(root / "runs", SIZE, "homodistil", SEED, 8) / "export" / KEPT_UNITS).read_text())
    for row in ("oneshot", "platon-window"):
        assert swapped[(8, row)]["kept"] == sum(map(len, kept.values())) and swapped[(8, row)]["units"] >= 0
    # exact counts on hand-made exports: (a) keeps {0,1,2,3} and {7}, the row {0,1,5,6} and {7}
    for variant, units in (("homodistil", {"ffn": [0, 1, 2, 3], "hidden": [7]}),
                           ("oneshot", {"ffn": [0, 1, 5, 6], "hidden": [7]})):
        path = run_dir(tmp_path, 0.5, variant, 0, 60) / "export" / KEPT_UNITS
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(units))
    assert swapped_units(tmp_path, {"size": 0.5, "variant": "oneshot", "seed": 0, "budget": 60}) == \
        {"units": 2, "kept": 5}
    assert swapped_units(tmp_path, {"size": 0.5, "variant": "oneshot", "seed": 1, "budget": 60}) is None
    block = STUDY.search((root / "docs" / "results.md").read_text()).group(0)
    share = 100 * swapped[(8, "oneshot")]["units"] / swapped[(8, "oneshot")]["kept"]
    assert "units swapped vs (a)" in block and f" | {share:.1f}% (1) | 1 |" in block


def test_page_sections_and_resume(study):
    root, argv = study
    page = root / "docs" / "results.md"
    text = page.read_text()
    block = STUDY.search(text).group(0)
    for row in ("| 6 | 0.5 | (a) | 3 |", "| 8 | 0.5 | (a) | 4 |", "| platon-window | 0.5 |", "| 8 | 0.5 | (a) − (b) |",
                "| – | 0 | **teacher** |", "| – | – | majority class |", "### Ablations at T = 8"):
        assert row in block, row
    assert (root / "docs" / "results" / "budget_gap_runs.png").stat().st_size > 5000  # named after the root
    done = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("T*/*/*/seed*/result.json")}
    assert len(done) == 5
    page.write_text("# kept title\n\nintro\n\n## Other section\n\nkept\n")
    assert compare_main([*argv, "--page-only"]) == 0  # nothing runs; the block goes in before the first section
    assert done == {p: p.stat().st_mtime_ns for p in done}
    text = page.read_text()
    marker = f"<!-- study {root / 'runs'} -->"
    assert text.startswith(f"# kept title\n\nintro\n\n{marker}") and text.endswith("## Other section\n\nkept\n")
    assert compare_main(argv) == 0 and page.read_text().count(marker) == 1  # replaced, not added
    # the main page's writer keeps the block
    write_page(json.loads((root / "runs" / "results.json").read_text()), page)
    assert page.read_text().count(marker) == 1 and "## Headline" in page.read_text()


def test_finetuning_only_where_asked_and_later_without_distilling_again(study):
    root, argv = study
    result = lambda variant, budget: json.loads(  # noqa: E731
        (run_dir(root / "runs", SIZE, variant, SEED, budget) / "result.json").read_text())
    assert result("homodistil", 6)["finetune"] == {} and result("oneshot", 6)["finetune"] == {}
    for variant in ("homodistil", "oneshot", "platon-window"):
        assert set(result(variant, 8)["finetune"]) == {"rt-polarity"}, variant
    teacher = json.loads((root / "runs" / "teacher" / "result.json").read_text())
    assert set(teacher["finetune"]) == {"rt-polarity"} and set(teacher["probe"]) == {"rt-polarity"}
    curves = {p: p.read_bytes() for p in (root / "runs" / "T6").glob("*/*/seed*/heldout.jsonl")}
    tuned8 = {v: result(v, 8)["finetune"] for v in ("homodistil", "oneshot")}
    argv = [a if a != "8" or argv[i - 1] != "--finetune-budgets" else "6,8" for i, a in enumerate(argv)]
    assert compare_main(argv) == 0
    assert {p: p.read_bytes() for p in curves} == curves and len(curves) == 2  # not distilled again
    for variant in ("homodistil", "oneshot"):
        assert set(result(variant, 6)["finetune"]) == {"rt-polarity"}
        assert result(variant, 8)["finetune"] == tuned8[variant]  # not fine-tuned again
    assert "fine-tuning (the runs at T = 6, 8," in (root / "docs" / "results.md").read_text()
    assert "model-minutes over 5 runs and the teacher" in (root / "docs" / "results.md").read_text()
    with pytest.raises(ConfigError, match="--finetune-budgets 7"):
        compare_main([*argv[:argv.index("--finetune-budgets")], "--finetune-budgets", "7"])


def _plan(*extra):
    args = build_parser().parse_intermixed_args(["c.yaml", "--sizes", "0.5", "--seeds", "0,1,2", *extra])
    return sweep_plan(args)


def test_sweep_plan_seeds_per_budget_and_ablations():
    plan, at = _plan("--variants", "homodistil,oneshot", "--budgets", "1000,60", "--budget-seeds", "1000=0,1",
                     "--ablations", "tf0.8", "--ablation-budget", "60")
    assert at == {60: [0, 1, 2], 1000: [0, 1]}
    assert [(r.budget, r.variant, r.seed) for r in plan] == [
        (60, "homodistil", 0), (60, "oneshot", 0), (1000, "homodistil", 0), (1000, "oneshot", 0), (60, "tf0.8", 0),
        (60, "homodistil", 1), (60, "oneshot", 1), (1000, "homodistil", 1), (1000, "oneshot", 1), (60, "tf0.8", 1),
        (60, "homodistil", 2), (60, "oneshot", 2), (60, "tf0.8", 2)]
    plan, _ = _plan("--variants", "oneshot", "--budgets", "60,500")  # a study without ablation rows
    assert [(r.budget, r.seed) for r in plan] == [(60, 0), (500, 0), (60, 1), (500, 1), (60, 2), (500, 2)]
    with pytest.raises(ConfigError, match="must be one of --budgets"):
        _plan("--budgets", "60", "--ablations", "tf0.8", "--ablation-budget", "500")
    with pytest.raises(ConfigError, match="unknown"):
        _plan("--ablations", "nope")
    with pytest.raises(ConfigError, match="expected T=SEEDS"):
        _plan("--budgets", "60", "--budget-seeds", "500=0")


def test_finetune_budgets_none_tunes_no_run():
    from homodistil.apps.compare import finetune_budgets  # noqa: PLC0415

    args = build_parser().parse_intermixed_args(["c.yaml", "--budgets", "60,500", "--finetune-budgets", "none"])
    assert finetune_budgets(args, sweep_plan(args)[0]) == set()
    args = build_parser().parse_intermixed_args(["c.yaml", "--budgets", "60,500", "--finetune-budgets", "500"])
    assert finetune_budgets(args, sweep_plan(args)[0]) == {500}


def test_finetune_minutes_add_the_measured_times():
    runs = [{"finetune_s": 60.0}, {"finetune_s": 120.0}, {}]  # the third was not fine-tuned
    assert finetune_minutes(runs, {"finetune_s": 180.0}) == \
        "; fine-tuning 6 model-minutes over 2 runs and the teacher (the teacher's 3)"
    assert finetune_minutes(runs, None) == "; fine-tuning 3 model-minutes over 2 runs"
    assert finetune_minutes([{}], {}) == ""
