"""Teacher preparation (an MLM head for a head-less teacher), held-out metrics, the report."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel

from homodistil.cli import main
from homodistil.config import PrepareConfig
from homodistil.data.batches import BlockBatches, build_blocks
from homodistil.engine import prepare as prep
from homodistil.engine.models import minilm_dir
from homodistil.eval.heldout import heldout_metrics
from homodistil.apps.report import write_report

from conftest import tiny_overrides
from recipe_runs import run_inprocess


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """A tiny BERT encoder without an MLM head, like a sentence-embedding model."""
    path = tmp_path_factory.mktemp("headless")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_prepare_gives_a_headless_teacher_a_trained_head(headless, tmp_path):
    assert any(k.startswith("cls.predictions") for k in prep.missing_head(headless))
    tok = AutoTokenizer.from_pretrained(headless)
    data = BlockBatches(build_blocks("kjv", tok, 32, max_documents=20), tok, mlm_probability=0.15, seed=0,
                      heldout_fraction=0.1)
    out = tmp_path / "prepared"
    info = prep.prepare_teacher(headless, out, data, PrepareConfig(steps=8, lr=1e-3, batch_size=8), "cls", tok,
                                progress=False)
    assert prep.missing_head(str(out)) == []
    assert json.loads((out / prep.PREP_FILE).read_text()) == info
    # training the head on this text lowers the held-out MLM loss of the random head
    assert info["heldout_mlm_loss"] < info["heldout_mlm_loss_before"]
    model = AutoModelForMaskedLM.from_pretrained(out)
    acc, loss = prep.masked_accuracy(model, "cls", data, 8)
    assert acc == pytest.approx(info["heldout_masked_accuracy"]) and loss == pytest.approx(info["heldout_mlm_loss"])


@pytest.mark.parametrize("delta, steps, checks", [(100.0, 4, 2), (1e-9, 8, 3)])
def test_preparation_stops_at_the_first_check_that_improves_by_less_than_delta(headless, tmp_path, delta, steps,
                                                                               checks):
    """Checks every 2 steps of at most 8: a delta no improvement reaches stops at the second check (step 4); one that
    every improvement passes trains all 8 steps (checks at 2, 4, 6); each check is the held-out loss at that step."""
    tok = AutoTokenizer.from_pretrained(headless)
    data = BlockBatches(build_blocks("kjv", tok, 32, max_documents=20), tok, mlm_probability=0.15, seed=0,
                        heldout_fraction=0.1)
    cfg = PrepareConfig(steps=8, lr=1e-3, batch_size=8, plateau_every=2, plateau_delta=delta, plateau_blocks=4)
    info = prep.prepare_teacher(headless, tmp_path / "prepared", data, cfg, "cls", tok, progress=False)
    assert info["steps"] == steps and info["max_steps"] == 8
    assert [s for s, _ in info["plateau"]] == [2 * (i + 1) for i in range(checks)]
    if steps < 8:  # the model published is the one scored at the stopping check
        model = AutoModelForMaskedLM.from_pretrained(tmp_path / "prepared")
        assert prep.masked_accuracy(model, "cls", data, 8, limit=4)[1] == pytest.approx(info["plateau"][-1][1],
                                                                                         rel=1e-5)


def test_an_interrupted_preparation_continues_from_its_snapshot_bit_for_bit(headless, tmp_path, monkeypatch,
                                                                           caplog):
    """Stopped right after the snapshot at step 4 of 8 (checks every 2), the next preparation of the
    same entry trains only steps 4-7 and publishes exactly the teacher an uninterrupted one does."""
    tok = AutoTokenizer.from_pretrained(headless)
    data = BlockBatches(build_blocks("kjv", tok, 32, max_documents=20), tok, mlm_probability=0.15, seed=0,
                        heldout_fraction=0.1)
    cfg = PrepareConfig(steps=8, lr=1e-3, batch_size=8, plateau_every=2, plateau_delta=1e-9, plateau_blocks=4)
    whole = prep.prepare_teacher(headless, tmp_path / "a" / "prepared", data, cfg, "cls", tok, progress=False)

    save = prep._save_snapshot

    def save_then_stop(partial, model, opt, sched, step, state):
        save(partial, model, opt, sched, step, state)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_save_snapshot", save_then_stop)
    out = tmp_path / "b" / "prepared"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_teacher(headless, out, data, cfg, "cls", tok, progress=False)
    assert not out.exists() and (out.parent / "prepared.partial" / "snapshot.pt").is_file()
    monkeypatch.setattr(prep, "_save_snapshot", save)
    caplog.set_level("INFO", logger="homodistil.prepare")
    resumed = prep.prepare_teacher(headless, out, data, cfg, "cls", tok, progress=False)
    assert "continuing from the snapshot after 4 steps" in caplog.text
    assert resumed == whole  # same curve, scores and SHA-256 of every published file: the same weights
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # the snapshot is gone


def test_recipe_prepares_once_and_reuses_the_cache(headless, tmp_path, monkeypatch):
    args = [f"model.teacher={headless}", "model.prepare.steps=2", "model.prepare.batch_size=4",
            f"model.prepare.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "pruning.t_f=2"]
    first = run_inprocess(tiny_overrides(tmp_path / "a") + args, train=False)
    first.close()
    assert first.teacher_dir.startswith(str(tmp_path / "cache")) and prep.missing_head(first.teacher_dir) == []

    def refuse(*a, **k):
        raise AssertionError("the prepared teacher should come from the cache")

    monkeypatch.setattr("homodistil.engine.recipe.prepare_teacher", refuse)
    second = run_inprocess(tiny_overrides(tmp_path / "b") + args, train=False)
    second.close()
    assert second.teacher_dir == first.teacher_dir


def test_compare_readies_the_teacher_once_before_its_workers(headless, tmp_path, monkeypatch):
    """``compare --jobs 2`` prepares the teacher in one process first; the runs then find it in the cache."""
    from homodistil.apps.compare import _ready_teacher_once  # noqa: PLC0415

    args = [f"model.teacher={headless}", "model.prepare.steps=2", "model.prepare.batch_size=4",
            f"model.prepare.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "pruning.t_f=2"]
    _ready_teacher_once(None, tiny_overrides(tmp_path / "first") + args)
    (prepared,) = (tmp_path / "cache").iterdir()
    assert prep.missing_head(str(prepared)) == []

    def refuse(*a, **k):
        raise AssertionError("the prepared teacher should come from the cache")

    monkeypatch.setattr("homodistil.engine.recipe.prepare_teacher", refuse)
    run = run_inprocess(tiny_overrides(tmp_path / "run") + args, train=False)
    run.close()
    assert run.teacher_dir == str(prepared)


def test_a_changed_prepared_teacher_is_refused_in_one_line(headless, tmp_path, capsys):
    """The cache entry is owner-only and its marker records each file's SHA-256 when it is published:
    a weights file changed afterwards (one byte, same size) stops the next run before it is used."""
    args = ["configs/tiny.yaml", f"model.teacher={headless}", "model.prepare.steps=2", "model.prepare.batch_size=4",
            f"model.prepare.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "pruning.t_f=2"]
    umask = os.umask(0o022)  # only our own modes can make the entry private
    try:
        first = run_inprocess(tiny_overrides(tmp_path / "a") + args[1:], train=False)
    finally:
        os.umask(umask)
    first.close()
    out = Path(first.teacher_dir)
    recorded = json.loads((out / prep.PREP_FILE).read_text())["sha256"]
    assert recorded == prep.file_digests(out) and "model.safetensors" in recorded
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (out.parent, out)} == \
        {out.parent.name: "0o700", out.name: "0o700"}
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(weights))
    capsys.readouterr()
    assert main(["distill", *args, *tiny_overrides(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("homodistil: error:")] == [
        f"homodistil: error: prepared teacher {out}: model.safetensors is changed since it was prepared "
        f"(SHA-256 mismatch): delete {out} to prepare the teacher again"] and "Traceback" not in err, err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_heldout_metrics_kl_is_zero_for_the_teacher_itself(tmp_path):
    recipe = run_inprocess(tiny_overrides(tmp_path / "run") + ["trainer.max_steps=3", "pruning.t_f=2",
                                                                "trainer.export=true"])
    recipe.close()
    d = recipe.cfg.data
    res = heldout_metrics({"student": str(tmp_path / "run" / "export"), "same": recipe.teacher_dir},
                          recipe.teacher_dir, recipe.data, batch_size=16, max_blocks=16)  # one batch of 16 blocks
    assert res["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert res["same"] == pytest.approx(res["teacher"])
    assert res["student"]["kl_to_teacher"] > 1e-4  # pruned to half width: it differs
    assert 0.0 <= res["student"]["masked_accuracy"] <= 1.0
    # MLM loss by hand on the first held-out batch of the same blocks
    tok = AutoTokenizer.from_pretrained(recipe.teacher_dir)
    data = BlockBatches(build_blocks(d.source, tok, d.max_seq_length, max_documents=d.max_documents), tok,
                      mlm_probability=d.mlm_probability, seed=recipe.cfg.trainer.seed,
                      heldout_fraction=d.heldout_fraction)
    batch = next(data.heldout_batches(16))
    model = AutoModelForMaskedLM.from_pretrained(recipe.teacher_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[scored], batch["labels"][scored])
    assert res["teacher"]["mlm_loss"] == pytest.approx(float(ce), rel=1e-5)


def test_report_writes_plots_and_tables(tmp_path):
    rows = [{"step": s, "loss/total": 3.0 - s / 10, "loss/lm": 2.0, "loss/kl": 0.1 * s + 0.01, "loss/hidden": 0.5,
             "prune/sparsity": min(0.5, s / 10), "prune/live_params": 1e6 * (1 - min(0.5, s / 10))} for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    results = {"tasks": {"rt-polarity": {}}, "models": {
        "teacher": {"tasks": {"rt-polarity": {"finetune": {"main": 80.0}, "probe": {"main": 75.0}}}},
        "student": {"tasks": {"rt-polarity": {"finetune": {"main": 78.0}, "probe": {"main": 70.0}}}}}}
    (eval_dir / "eval_results.json").write_text(json.dumps(results))
    (eval_dir / "eval_results.md").write_text("| model | rt-polarity |\n|---|---|\n| teacher | 80.0 |")
    held = {"teacher": {"mlm_loss": 2.5, "masked_accuracy": 0.4, "kl_to_teacher": 0.0},
            "student": {"mlm_loss": 3.0, "masked_accuracy": 0.3, "kl_to_teacher": 0.42}}
    report = write_report(tmp_path, eval_dir, held, notes=["wall time 1 min"]).read_text()
    for png in ("losses.png", "sparsity.png", "scores.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    assert "| student | 3.000 | 30.0% | 0.420 |" in report
    assert "student parameters 0.90M -> 0.50M" in report and "| teacher | 80.0 |" in report


def test_prepared_teacher_cache_is_keyed_on_contents_not_location(tmp_path):
    """A reinstall (the teacher and tokenizer at another path) reuses the prepared teacher;
    changed weights do not."""
    import shutil

    from homodistil.config import PrepareConfig
    from homodistil.engine.prepare import cache_dir, fingerprint

    first = tmp_path / "site-a" / "model"
    first.mkdir(parents=True)
    (first / "config.json").write_text('{"model_type": "bert"}')
    (first / "model.safetensors").write_bytes(b"\x00weights" * 1000)
    second = tmp_path / "site-b" / "model"
    shutil.copytree(first, second)
    prep = PrepareConfig(cache_dir=str(tmp_path / "cache"))
    assert cache_dir(str(first), "data", prep) == cache_dir(str(second), "data", prep)
    assert fingerprint(str(first)) == fingerprint(str(second)) != fingerprint("bert-base-uncased")
    (second / "model.safetensors").write_bytes(b"\x01weights" * 1000)
    assert cache_dir(str(first), "data", prep) != cache_dir(str(second), "data", prep)
    assert cache_dir(str(first), "data", prep) != cache_dir(str(first), "other data", prep)


def test_prepare_leaves_the_callers_rng_alone_and_publishes_atomically(headless, tmp_path):
    """A cold-cache run must train like a warm one (the preparation once reseeded the global RNG),
    and a second preparation of the same key (a concurrent worker) must not fail or mix files."""
    tok = AutoTokenizer.from_pretrained(headless)
    data = BlockBatches(build_blocks("kjv", tok, 32, max_documents=20), tok, mlm_probability=0.15, seed=0,
                      heldout_fraction=0.1)
    cfg = PrepareConfig(steps=2, lr=1e-3, batch_size=4)
    out = tmp_path / "prepared"
    torch.manual_seed(123)
    want = torch.rand(5)
    torch.manual_seed(123)
    first = prep.prepare_teacher(headless, out, data, cfg, "cls", tok, progress=False)
    assert torch.equal(torch.rand(5), want)
    second = prep.prepare_teacher(headless, out, data, cfg, "cls", tok, progress=False)
    assert second == first  # the published preparation is kept and reported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary left behind


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing", "missing: no such run directory"),
    (lambda d: d, "no metrics.jsonl (not a run directory"),
    (lambda d: (d / "metrics.jsonl").write_text("") or d, "metrics.jsonl: no steps logged yet"),
], ids=["missing directory", "not a run directory", "no steps yet"])
def test_report_on_a_directory_without_a_run_is_one_line(tmp_path, capsys, make, expected):
    from homodistil.cli import main  # noqa: PLC0415

    run_dir = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("homodistil: error: ") and expected in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no report, no plots


def test_a_headless_teacher_loads_with_one_line_instead_of_the_load_report(capfd, caplog):
    """MiniLM lacks the MLM head we add: transformers' MISSING/UNEXPECTED table is expected, so one
    line says why instead (the table used to open every demo that prepared its teacher)."""
    import logging  # noqa: PLC0415

    def shown() -> str:  # transformers logs through its own handler: look at the records and the fds
        text = "".join(capfd.readouterr()) + "".join(r.getMessage() for r in caplog.records)
        caplog.clear()
        return text

    source = str(minilm_dir())
    with caplog.at_level(logging.INFO):
        AutoModelForMaskedLM.from_pretrained(source)  # what the plain call shows: the test can see it
        assert "LOAD REPORT" in shown()
        model = prep.load_headless(source, "cls")
        lines = [r.getMessage() for r in caplog.records if r.name == "homodistil.prepare"]
        printed = shown()
    assert "LOAD REPORT" not in printed and "MISSING" not in printed, printed
    assert lines == [f"teacher {source} has no MLM head: a new one (6 tensors under 'cls') is trained before "
                     "distillation"], lines
    assert hasattr(model, "cls")


def test_a_load_report_surprise_is_still_surfaced():
    """Only the new head (missing) and the encoder's pooler (unexpected) are explained away."""
    info = {"missing_keys": ["cls.predictions.bias", "bert.encoder.layer.0.output.dense.weight"],
            "unexpected_keys": ["pooler.dense.weight", "bert.pooler.dense.bias", "extra.weight"],
            "mismatched_keys": [], "error_msgs": []}
    assert prep.load_surprises(info, "cls") == ["missing bert.encoder.layer.0.output.dense.weight",
                                                "unexpected extra.weight"]


def test_a_pinned_headless_hub_teacher_is_refused_before_preparing(monkeypatch):
    """The preparation and its cache know a teacher by name: with model.revision set they would
    prepare (and cache) the default branch, so the combination stops in one line instead."""
    from homodistil.config import ConfigError, load_config  # noqa: PLC0415
    from homodistil.engine import recipe as R  # noqa: PLC0415

    sha = "86b5e0934494bd15c9632b12f734a8a67f723594"
    monkeypatch.setattr(R, "missing_head", lambda source: ["cls.predictions.bias"])
    monkeypatch.setattr(R, "prepare_teacher", lambda *a, **k: pytest.fail("nothing is prepared"))
    run = R.Recipe(load_config(None, ["model.teacher=someone/headless-encoder", f"model.revision={sha}"]))
    with pytest.raises(ConfigError, match="preparing one does not follow model.revision"):
        run._teacher_path(None, "mlm", None)  # refused before the tokenizer or the data are used
