"""Runs that survive faults: kill/resume, kill during save, full disk, NaN, bad data.

The world-size-2 trials (tests/fault_harness.py) kill or signal a tiny distill-while-prune
job at chosen steps, relaunch it as a user would and require the end state to equal an
uninterrupted run's bit for bit (fp32): weights, masks, importance state, every checkpoint
file and the logged losses. More seeded trials: ``python benchmarks/faults.py``.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from homodistil.cli import main
from homodistil.engine import checkpoint
from homodistil.engine.zero import gather

import fault_harness as H
from conftest import tiny_overrides
from recipe_runs import run_inprocess


# ---------------------------------------------------------------------------------------------
# kill anywhere, resume exactly (world size 2, gloo)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, one per trial configuration (stage, data, teacher), made when first asked."""
    made = {}

    def reference(config):
        if config not in made:
            out = tmp_path_factory.mktemp("reference")
            proc = H.launch(H.job(out, *config))
            assert proc.returncode == 0, proc.stderr[-4000:]
            made[config] = out
        return made[config]

    return reference


@pytest.mark.parametrize("trial", H.ci_trials(seed=0), ids=lambda t: f"{t.fault}-zero{t.stage}"
                         + ("-teacher_zero3" if t.teacher_zero3 else ""))
def test_fault_then_relaunch_ends_exactly_like_an_uninterrupted_run(trial, references, tmp_path):
    result = H.run_trial(trial, tmp_path / "run", references(trial.config))
    print(f"\n{trial.fault}: resumed from step {result.resumed_from}, {result.steps_lost} step(s) lost, "
          f"{result.lost_beyond_checkpoint} beyond the last checkpoint; {result.exact}")
    assert result.fault_seen, result.log[-6000:]
    assert result.resumed_exactly, (result.exact, result.log[-6000:])
    assert result.lost_beyond_checkpoint == 0
    if trial.kind == "term":
        assert result.steps_lost == 0
    if trial.kind == "kill_in_save":  # the half-written step-6 checkpoint was ignored and removed
        assert result.resumed_from == 3 and result.removed_partial
    if trial.kind == "enospc_in_save":
        assert result.message.endswith("could not write "
                                       f"{tmp_path / 'run' / 'checkpoints' / 'step00000006'} (No space left on device on rank 1): "
                                       "removed it; latest is still step00000003"), result.message
        assert result.resumed_from == 3


def test_latest_never_names_an_incomplete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for tag, complete in (("step00000003", True), ("step00000006", True), ("step00000009", False)):
        (root / tag).mkdir(parents=True)
        if complete:
            (root / tag / checkpoint.COMPLETE).write_text("")
    (root / checkpoint.LATEST).write_text("step00000009")  # e.g. written by hand or by an older version
    assert checkpoint.find_latest(root) == "step00000006"
    assert checkpoint.remove_incomplete(root) == ["step00000009"]
    assert checkpoint.complete_tags(root) == ["step00000003", "step00000006"]


# ---------------------------------------------------------------------------------------------
# numeric faults (world size 1, in this process)
# ---------------------------------------------------------------------------------------------

def _one_error_line(err: str) -> str:
    """The CLI's error: exactly one ``homodistil: error:`` line and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("homodistil: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    return lines[0]


SHORT = ["trainer.max_steps=4", "pruning.t_f=4", "pruning.mask_interval=10", "pruning.shrink_interval=1000"]


@pytest.mark.parametrize("stage,fault", [(0, "nan@2"), (2, "nan_grad@2"), (3, "inf@2")])
def test_a_non_finite_step_changes_nothing_and_the_run_goes_on(tmp_path, monkeypatch, stage, fault):
    """Step 2's loss (or only its gradient) is not finite: weights, Adam moments and step count,
    and the importance state after step 2 equal those after step 1; the LR schedule moves on;
    step 3 trains again. ZeRO-0 is our optimizer's check, ZeRO-2/3 DeepSpeed's own."""
    monkeypatch.setenv("HOMODISTIL_FAULT", fault)
    recipe = run_inprocess(tiny_overrides(tmp_path, deepspeed__zero_optimization__stage=stage) + SHORT, train=False)
    snapshots, log = {}, recipe._log

    def snapshot(terms, step_time, skipped):
        log(terms, step_time, skipped)
        params, moments, adam_step = gather(recipe.engine)
        snapshots[recipe.step] = {"params": params, "moments": moments, "adam_step": adam_step, "skipped": skipped,
                                  "lr": recipe.engine.optimizer.param_groups[0]["lr"], "loss": terms["loss"],
                                  "pruner": copy.deepcopy(recipe.pruner.state_dict()),
                                  "importance": copy.deepcopy(recipe.pruner.local_state_dict())}

    recipe._log = snapshot
    recipe.train()
    recipe.close()
    one, two, three = snapshots[1], snapshots[2], snapshots[3]
    assert [snapshots[s]["skipped"] for s in (1, 2, 3, 4)] == [False, True, False, False]
    assert not torch.isfinite(torch.tensor(two["loss"])) or fault == "nan_grad@2"
    assert two["adam_step"] == one["adam_step"] == 1 and three["adam_step"] == 2
    for name in one["params"]:
        assert torch.equal(two["params"][name], one["params"][name]), name
        assert all(torch.equal(two["moments"][name][k], one["moments"][name][k]) for k in ("exp_avg", "exp_avg_sq"))
        assert not torch.equal(three["params"][name], two["params"][name]) or "LayerNorm" in name or "bias" in name
    assert one["importance"]["state"] and H._equal(two["pruner"], one["pruner"])  # masks, scores, count
    assert H._equal(two["importance"], one["importance"])  # the EMAs
    # linear decay from 1e-3 to 0 over 4 steps: the skipped step still counts
    assert [snapshots[s]["lr"] for s in (1, 2, 3)] == pytest.approx([7.5e-4, 5e-4, 2.5e-4], rel=1e-6)
    assert torch.isfinite(torch.tensor(three["loss"]))


def test_gradient_accumulation_updates_once_per_step_and_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 per step train like 1 of 4 (the same global batch): the verdict
    "update applied" must come from the accumulation boundary, once per step."""
    from recipe_runs import losses

    common = SHORT + ["deepspeed.zero_optimization.stage=2"]
    run_inprocess(tiny_overrides(tmp_path / "big") + common).close()
    recipe = run_inprocess(tiny_overrides(tmp_path / "accum") + common + [
        "deepspeed.gradient_accumulation_steps=2", "deepspeed.train_micro_batch_size_per_gpu=2"])
    recipe.close()
    assert recipe.engine.global_steps == 4 and recipe.engine.skipped_steps == 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "accum")), torch.tensor(losses(tmp_path / "big")),
                               atol=1e-5, rtol=1e-5)


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOMODISTIL_FAULT", "nan@2x10")
    code = main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path), "trainer.max_steps=8", "pruning.t_f=8",
                 "pruning.mask_interval=10", "trainer.save_every=1", "trainer.max_bad_steps=3",
                 "trainer.keep_checkpoints=100"])
    err = _one_error_line(capsys.readouterr().err)
    assert code == 2
    root = tmp_path / "checkpoints"
    assert f"steps 2-4 all had a non-finite loss or gradient (trainer.max_bad_steps=3): stopped; {root / 'step00000004'} " \
           "holds the weights of step 1" in err, err
    assert checkpoint.find_latest(root) == "step00000004"
    from homodistil.engine.export import _full_state

    good, last = _full_state(root, "step00000001"), _full_state(root, "step00000004")
    assert all(torch.equal(good[k], last[k]) for k in good)
    (p1,), (p4,) = (list(checkpoint.importance_states(root, tag)) for tag in ("step00000001", "step00000004"))
    assert p1["state"] and all(torch.equal(p1["state"][n]["ema"], p4["state"][n]["ema"]) for n in p1["state"])


# ---------------------------------------------------------------------------------------------
# disk
# ---------------------------------------------------------------------------------------------

def test_a_disk_too_small_for_one_checkpoint_stops_before_training(tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))
    code = main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path)])
    err = _one_error_line(capsys.readouterr().err)
    # 1.04M parameters x 24 bytes
    assert code == 2 and err.endswith(
        f"trainer.output_dir: 5.0 MiB free on the file system of {tmp_path / 'checkpoints'}, "
        f"a checkpoint needs about 23.9 MiB"), err
    assert not (tmp_path / "metrics.jsonl").exists()  # no step was run


# ---------------------------------------------------------------------------------------------
# bad data: every bad input is handled (skipped and logged, or rebuilt) or one line naming it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what,make,expected", H.BAD_INPUTS, ids=[c[0] for c in H.BAD_INPUTS])
def test_bad_input(tmp_path, what, make, expected):
    outcome, message = H.try_input(make, tmp_path)
    kind, _, fragment = expected.partition(": ")
    assert outcome == kind and fragment in message and "\n" not in message, (outcome, message)


def test_a_corrupt_cache_is_rebuilt_to_the_same_blocks(tmp_path):
    from homodistil.data.batches import build_blocks

    source = H._bad_cache("truncated")(tmp_path / "a")
    fresh = build_blocks(source, H.tokenizer(), H.SEQ)
    assert torch.equal(build_blocks(source, H.tokenizer(), H.SEQ, cache_dir=tmp_path / "a" / "cache"), fresh)
    assert torch.equal(build_blocks(source, H.tokenizer(), H.SEQ, cache_dir=tmp_path / "a" / "cache"), fresh)


@pytest.mark.parametrize("source,expected", [
    ("[kjv, {tmp}/shard9.txt]", "data.source '{tmp}/shard9.txt' is neither a known corpus"),
    ("{tmp}/latin1.txt", "{tmp}/latin1.txt: not UTF-8 text (byte 3)"),
    ("{tmp}/null.jsonl", "{tmp}/null.jsonl:2: 'text' is null, not a string"),
], ids=["missing shard", "non-UTF-8", "null text"])
def test_bad_data_stops_the_cli_with_one_line_before_any_model_work(tmp_path, capsys, source, expected):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "null.jsonl").write_text('{"text": "In the beginning."}\n{"text": null}\n')  # once trained as "None"
    source, expected = source.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    code = main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path / "run"), f"data.source={source}"])
    err = _one_error_line(capsys.readouterr().err)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run" / "teacher").exists()


@pytest.mark.parametrize("spec", ["kill", "kill@x", "boom@3", "nan@3:node=1", "kill@3:rank"])
def test_a_malformed_fault_spec_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, spec):
    monkeypatch.setenv("HOMODISTIL_FAULT", spec)
    code = main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path / "run")])
    err = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "HOMODISTIL_FAULT: " in err and spec in err, err
    assert not (tmp_path / "run").exists()
