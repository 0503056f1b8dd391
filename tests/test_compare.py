"""`homodistil compare` end to end on a tiny config: the five variants differ only where they should."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from homodistil.apps.compare import VARIANTS, compare_main, run_dir
from homodistil.config import load_config
from homodistil.data.batches import from_config as data_from_config
from homodistil.eval.heldout import heldout_metrics

from conftest import TINY
from recipe_runs import REPO, run_inprocess

SIZE, SEED = 0.5, 3
ARGS = [*TINY, "trainer.max_steps=6", "pruning.t_i=1", "pruning.t_f=4", "pruning.mask_interval=1",
        "pruning.shrink_interval=2", "pruning.metric=sensitivity", "pruning.calibration_steps=2",
        "trainer.eval_every=2", "evaluate.heldout_blocks=8", "evaluate.max_train=48", "evaluate.max_eval=24",
        "evaluate.finetune_tasks=[rt-polarity]"]
INTENDED = {"homodistil": set(), "oneshot": {"pruning.schedule"}, "scratch": {"model.init"},
            "magnitude": {"pruning.metric"}, "no-kl": {"loss.alpha_pred"}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    argv = [str(REPO / "configs" / "tiny.yaml"), *ARGS, "--sizes", str(SIZE), "--seeds", str(SEED),
            "--out", str(root / "runs"), "--page", str(root / "docs" / "results.md")]
    assert compare_main(argv) == 0
    return root, argv


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(root, variant):
    return run_dir(root / "runs", SIZE, variant, SEED)


def test_variants_differ_only_in_their_own_keys(sweep):
    root, _ = sweep
    configs = {v: _flat(yaml.safe_load((_run(root, v) / "config.yaml").read_text())) for v in VARIANTS}
    base = configs["homodistil"]
    assert base["trainer.seed"] == SEED and base["pruning.sparsity.ffn"] == SIZE
    for variant, cfg in configs.items():
        differ = {k for k in base if cfg[k] != base[k]} - {"trainer.output_dir"}
        assert differ == INTENDED[variant], variant


def test_same_batches_and_start_where_they_should(sweep):
    root, _ = sweep
    metrics = {v: _jsonl(_run(root, v) / "metrics.jsonl") for v in VARIANTS}
    heldout = {v: _jsonl(_run(root, v) / "heldout.jsonl") for v in VARIANTS}
    # (a), (d), (e) start as the teacher: KL 0 at step 0; one-shot and scratch do not
    for v in ("homodistil", "magnitude", "no-kl"):
        assert heldout[v][0]["step"] == 0 and heldout[v][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert heldout["oneshot"][0]["kl"] > 1e-4 and heldout["scratch"][0]["kl"] > heldout["oneshot"][0]["kl"]
    # same batch and same student at step 1: (a) and (e) agree on every term they share, (e) has no KL
    for term in ("loss/lm", "loss/hidden", "loss/attention"):
        assert metrics["no-kl"][0][term] == metrics["homodistil"][0][term], term
    assert "loss/kl" not in metrics["no-kl"][0] and "loss/kl" in metrics["homodistil"][0]
    # (d) is (a) until the first mask (end of step 2): identical losses, then the metric picks other units
    untimed = {v: [{k: x for k, x in r.items() if not k.startswith(("time/", "perf/", "kernels/"))} for r in rows]
               for v, rows in metrics.items()}  # timings differ from run to run
    assert untimed["magnitude"][:2] == untimed["homodistil"][:2]
    assert metrics["magnitude"][-1]["loss/total"] != metrics["homodistil"][-1]["loss/total"]
    # one-shot and scratch are at the final size from step 1, (a) shrinks to it on the schedule
    final = metrics["homodistil"][-1]["prune/live_params"]
    assert metrics["homodistil"][0]["prune/live_params"] > final
    for v in ("oneshot", "scratch"):
        assert {r["prune/live_params"] for r in metrics[v]} == {final}, v
    # every variant ends at the same size
    results = {v: json.loads((_run(root, v) / "result.json").read_text()) for v in VARIANTS}
    assert len({json.dumps(r["params"]) for r in results.values()}) == 1
    assert len({json.dumps(json.loads((_run(root, v) / "export" / "config.json").read_text())["intermediate_size"])
                for v in VARIANTS}) == 1


def test_heldout_curve_ends_at_the_exported_students_figures(sweep):
    root, _ = sweep
    result = json.loads((_run(root, "homodistil") / "result.json").read_text())
    assert [r["step"] for r in result["heldout"]] == [0, 2, 4, 6]
    cfg = load_config(_run(root, "homodistil") / "config.yaml")  # the run's resolved config
    data = data_from_config(cfg.data, AutoTokenizer.from_pretrained(result["teacher_dir"]), seed=SEED)
    ref = heldout_metrics({"s": str(_run(root, "homodistil") / "export")}, result["teacher_dir"], data, max_blocks=8)
    assert result["final"]["kl"] == pytest.approx(ref["s"]["kl_to_teacher"], rel=1e-4, abs=1e-7)
    assert result["final"]["mlm_loss"] == pytest.approx(ref["s"]["mlm_loss"], rel=1e-5)
    assert result["final"]["teacher_mlm_loss"] == pytest.approx(ref["teacher"]["mlm_loss"], rel=1e-5)
    masked = sum(int((b["labels"] != -100).sum()) for b in data.heldout_batches(16, 8))  # every evaluation's count
    assert {r["scored_tokens"] for r in result["heldout"]} == {masked} == {ref["s"]["scored_tokens"]}


def _scratch(out_dir):
    recipe = run_inprocess([*ARGS, f"trainer.output_dir={out_dir}", f"pruning.sparsity.ffn={SIZE}",
                            f"pruning.sparsity.attention={SIZE}", f"pruning.sparsity.hidden={SIZE}",
                            "model.init=scratch"], train=False)
    recipe.close()
    return recipe


def test_scratch_student_is_random_at_the_final_shape(tmp_path):
    recipe = _scratch(tmp_path / "a")
    lm = recipe.engine.module.lm
    teacher = recipe.teacher.state_dict()
    assert lm.config.intermediate_size == 32 and lm.config.hidden_size == 16  # half of 64 and 32
    for name, p in lm.state_dict().items():
        assert p.shape[0] <= teacher[name].shape[0]
    w, t = lm.bert.encoder.layer[0].intermediate.dense.weight, teacher["bert.encoder.layer.0.intermediate.dense.weight"]
    assert not torch.equal(w, t[: w.shape[0], : w.shape[1]])
    again = _scratch(tmp_path / "b")
    assert torch.equal(again.engine.module.lm.bert.encoder.layer[0].intermediate.dense.weight, w)  # seeded init


def test_page_and_resume(sweep):
    root, argv = sweep
    page = (root / "docs" / "results.md").read_text()
    for variant in VARIANTS:
        assert f"| {SIZE:g} | {variant} |" in page
    assert f"| {SIZE:g} | oneshot |" in page.split("## What was run")[0]  # the headline table
    for png in ("heldout_s0.5.png", "scores_vs_params.png"):
        assert (root / "docs" / "results" / png).stat().st_size > 5000, png
    done = {v: (_run(root, v) / "result.json").stat().st_mtime_ns for v in VARIANTS}
    (root / "docs" / "results.md").write_text(page.replace(
        "_No reading yet: write it here; `--page-only` keeps this section._", "hand-written reading"))
    assert compare_main(argv) == 0  # everything finished: nothing runs again, the reading is kept
    assert done == {v: (_run(root, v) / "result.json").stat().st_mtime_ns for v in VARIANTS}
    assert "hand-written reading" in (root / "docs" / "results.md").read_text()
