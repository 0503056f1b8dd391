"""The recipe under DeepSpeed on CPU: shrink equivalence, resume, export, teacher hosting.

Tolerances: fp32 masked and shrunk models run the same arithmetic except for sums over
extra exact zeros, whose blocking can differ in the last bits: 1e-5 absolute on logits and
losses. Resume is exact (bit-equal) in fp32.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from homodistil.cli import main
from homodistil.engine import checkpoint
from homodistil.engine.export import KEPT_UNITS, _full_state
from homodistil.engine.models import student_groups
from homodistil.pruning.groups import shrink_tensors
from homodistil.engine.models import teacher_outputs

from conftest import assert_close_at_scale, tiny_overrides
from recipe_runs import losses, run_inprocess, run_torchrun

STEPS = ["trainer.max_steps=6", "pruning.t_f=4"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _outputs(recipe, batch):
    with torch.no_grad():
        out = recipe.engine(batch["input_ids"], batch["attention_mask"], batch["labels"] != -100, True, True)
    return {"logits": out["logits"].float(), "hidden": torch.stack(out["hidden"]).float(),
            "attentions": torch.stack(out["attentions"]).float()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shrink_is_invisible_to_outputs_and_losses(tmp_path, stage):
    """Masked vs shrunk: same outputs at the shrink, same loss trajectory afterwards."""
    zero = [f"deepspeed.zero_optimization.stage={stage}"]
    # Run B: masks grow every step, one shrink at t_f; outputs are compared around that shrink.
    recipe = run_inprocess(tiny_overrides(tmp_path / "b") + zero + STEPS + ["pruning.shrink_interval=1000"], train=False)
    batch = recipe._batch(0)
    captured = []
    shrink = recipe._shrink

    def checked_shrink():
        before = _outputs(recipe, batch)
        shrink()
        captured.append((before, _outputs(recipe, batch)))

    recipe._shrink = checked_shrink
    recipe.train()
    recipe.close()
    assert len(captured) == 1
    before, after = captured[0]
    assert before["hidden"].shape[-1] == after["hidden"].shape[-1]  # projected to the teacher's width
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=1e-4, msg=key)
    assert recipe.kept == {"ffn": 32, "attention": 4, "hidden": 16}
    # Run A: shrink after every mask update; the loss trajectory must match run B's.
    run_inprocess(tiny_overrides(tmp_path / "a") + zero + STEPS + ["pruning.shrink_interval=1"]).close()
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=1e-5)
    assert la[-1] != la[0]  # it trained


def test_world_size_2_matches_world_size_1(tmp_path):
    """Same global batch at world size 1 and 2: same losses, importance scores and masks;
    and at world size 2 the shrunk run's losses match the masked run's."""
    common = STEPS + ["deepspeed.zero_optimization.stage=2", "trainer.export=false"]
    run_torchrun(tiny_overrides(tmp_path / "ws2_masked") + common + ["deepspeed.train_micro_batch_size_per_gpu=2",
                                                                      "pruning.shrink_interval=1000"])
    run_torchrun(tiny_overrides(tmp_path / "ws2_shrunk") + common + ["deepspeed.train_micro_batch_size_per_gpu=2",
                                                                      "pruning.shrink_interval=1"])
    run_inprocess(tiny_overrides(tmp_path / "ws1") + common + ["pruning.shrink_interval=1000"]).close()
    l1, l2m, l2s = (torch.tensor(losses(tmp_path / d)) for d in ("ws1", "ws2_masked", "ws2_shrunk"))
    torch.testing.assert_close(l2s, l2m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2m, l1, atol=1e-5, rtol=1e-5)
    s1, _ = checkpoint.load_run_state(tmp_path / "ws1" / "checkpoints", "step00000006", 0)
    s2, _ = checkpoint.load_run_state(tmp_path / "ws2_masked" / "checkpoints", "step00000006", 0)
    for name in s1["scores"]:
        assert torch.equal(s1["masks"][name], s2["masks"][name]), name
        assert_close_at_scale(s2["scores"][name], s1["scores"][name], rtol=1e-4, msg=name)
    e1, e2 = (_emas(tmp_path / d / "checkpoints", "step00000006") for d in ("ws1", "ws2_masked"))
    assert e1.keys() == e2.keys() and e1
    scale = torch.stack([e.abs().max() for e in e1.values()])  # the model's importance scale
    for name in e1:
        assert_close_at_scale(e2[name], e1[name], rtol=1e-4, msg=name, of=scale)


def _emas(root, tag) -> dict:
    """PLATON's EMA of every parameter, whole, from every rank's saved fragment."""
    out = {}
    for piece in checkpoint.importance_states(root, tag):
        for name, st in piece["state"].items():
            full = out.setdefault(name, torch.zeros(math.prod(piece["shapes"][name])))
            start, n = piece["fragments"][name]
            full[start:start + n] = st["ema"]
    return out


@pytest.mark.parametrize("streaming", [False, True], ids=["blocks", "streaming"])
def test_resume_is_exact_across_a_shrink(tmp_path, streaming):
    """Stopped at step 4 and resumed: the same final weights as an uninterrupted run, with
    dropout on (so the RNG state must be restored) and a shrink at step 6 after the resume;
    for pre-built blocks and for a streamed corpus (whose position is in the checkpoint)."""
    args = ["trainer.max_steps=8", "pruning.t_f=6", "pruning.shrink_interval=3", "trainer.save_every=4",
            "model.dropout=0.1", "deepspeed.zero_optimization.stage=2", f"data.streaming={str(streaming).lower()}",
            "trainer.eval_every=2", "evaluate.heldout_blocks=3"]
    run_inprocess(tiny_overrides(tmp_path / "full") + args).close()
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step00000004", resumed / "step00000004")
    (resumed / "latest").write_text("step00000004")
    # what a predecessor killed after step 6 had logged: the resumed run must drop steps 5-6
    shutil.copy(tmp_path / "full" / "heldout.jsonl", tmp_path / "resumed" / "heldout.jsonl")
    recipe = run_inprocess(tiny_overrides(tmp_path / "resumed") + args, train=False)
    assert recipe.step == 4 and recipe.kept["ffn"] == 36 and not recipe.pruner.is_dense()  # shrunk at 3, masked at 4
    recipe.train()
    recipe.close()
    assert recipe.kept == {"ffn": 32, "attention": 4, "hidden": 16}
    full = _full_state(tmp_path / "full" / "checkpoints", "step00000008")
    again = _full_state(resumed, "step00000008")
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    origins = [checkpoint.load_run_state(root, "step00000008", 0)[0]["origin"]
               for root in (tmp_path / "full" / "checkpoints", resumed)]
    assert origins[0].keys() == origins[1].keys()
    assert all(torch.equal(origins[0][g], origins[1][g]) for g in origins[0])
    assert losses(tmp_path / "full")[4:] == losses(tmp_path / "resumed")
    # held-out rows: each evaluated step once (0, 2, 4 from before the stop; 6, 8 after), same figures
    full_rows, resumed_rows = ((tmp_path / run / "heldout.jsonl").read_text() for run in ("full", "resumed"))
    assert [json.loads(r)["step"] for r in resumed_rows.splitlines()] == [0, 2, 4, 6, 8]
    assert resumed_rows == full_rows


def test_export_cli_on_a_gpt2_checkpoint(tmp_path, capsys):
    """`homodistil export` names each family's widths through its adapter (it once read
    ``config.intermediate_size``, which GPT-2's config does not have)."""
    args = ["model.tiny.family=gpt2", "trainer.max_steps=2", "pruning.t_f=2", "trainer.save_every=2"]
    run_inprocess(tiny_overrides(tmp_path / "run") + args).close()
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "step00000002"), str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    c = model.config
    assert (c.n_embd, c.n_inner) == (16, 32)  # half of the tiny teacher's 32 and 64
    assert f"widths ffn 32, attention 4, hidden 16) to {tmp_path / 'out'}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny run with one checkpoint (step 2), for the bad-export cases (which copy it first)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    run_inprocess(tiny_overrides(run) + ["trainer.max_steps=2", "pruning.t_f=2", "trainer.save_every=2"]).close()
    return run


BAD_EXPORTS = [  # (what to do to a copy of the run -> export's OUT_DIR, expected fragment of the one line)
    ("out_dir is a file", lambda run: (run / "model.bin").write_text("x") and run / "model.bin",
     "model.bin: exists and is not a directory"),
    ("truncated meta.json", lambda run: _damage_meta(run, lambda text: text[:len(text) // 2]),
     "meta.json: unreadable (JSONDecodeError"),
    ("meta.json without the widths", lambda run: _damage_meta(run, lambda text: '{"step": 2}'),
     "meta.json: damaged (no teacher_config, kept, n_proj)"),
    ("meta.json not an object", lambda run: _damage_meta(run, lambda text: "[1, 2]"),
     "meta.json: damaged (no teacher_config, kept, n_proj)"),
]


def _damage_meta(run, change) -> object:
    meta = run / "checkpoints" / "step00000002" / "meta.json"
    meta.write_text(change(meta.read_text()))
    return run / "export-out"


@pytest.mark.parametrize("make,expected", [b[1:] for b in BAD_EXPORTS], ids=[b[0] for b in BAD_EXPORTS])
def test_bad_export_is_one_line_and_writes_nothing(saved_run, tmp_path, capsys, make, expected):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    out = make(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("homodistil: error: ") and expected in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def test_export_of_a_masked_checkpoint_matches_the_student(tmp_path):
    """Export mid-run (masks live, not yet shrunk): a plain from_pretrained model with the
    pruned widths whose logits equal the masked student's."""
    args = ["trainer.max_steps=4", "pruning.t_f=4", "pruning.shrink_interval=1000", "trainer.save_every=2"]
    run_inprocess(tiny_overrides(tmp_path / "run") + args).close()
    ckpt = tmp_path / "run" / "checkpoints" / "step00000002"
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "exported").eval()
    # s(2) = 0.5·(1 − 0.5³) = 0.4375 -> heads keep round(8·0.5625) = 4 (of 8), ffn 64 − 28 = 36
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_attention_heads) == (16, 36, 4)
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # no custom code
    at_step2 = tmp_path / "at2" / "checkpoints"
    shutil.copytree(ckpt, at_step2 / "step00000002")
    recipe = run_inprocess(tiny_overrides(tmp_path / "at2") + args, train=False)
    assert recipe.step == 2 and not recipe.pruner.is_dense()
    batch = recipe._batch(0)
    with torch.no_grad():
        student = recipe.engine.module.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exported = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    recipe.close()
    torch.testing.assert_close(exported, student, atol=1e-5, rtol=1e-4)


def test_final_export_at_the_end_of_a_run(tmp_path):
    run_inprocess(tiny_overrides(tmp_path / "run") + STEPS + ["trainer.export=true", "pruning.shrink_interval=2"]).close()
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "export")
    assert (model.config.hidden_size, model.config.intermediate_size) == (16, 32)
    assert (tmp_path / "run" / "export" / "tokenizer.json").exists()


def test_kept_units_name_the_teacher_units_the_student_kept(tmp_path):
    """kept_units.json through three shrinks is the exact cut of the teacher: a learning rate of 1e-30 moves no
    weight (every nonzero fp32 weight's ulp is far larger; zeros move by ~1e-30), so the student's tensors must
    equal the teacher's sliced to the listed units."""
    # t_f 4: the widths move at steps 1, 2 and 3 (FFN 44, 36, 32 in multiples of 4; at t_f 3 the last step keeps 32)
    recipe = run_inprocess(tiny_overrides(tmp_path / "run") + STEPS + [
        "trainer.export=true", "pruning.shrink_interval=1", "optimizer.lr=1e-30"])
    units = json.loads((tmp_path / "run" / "export" / KEPT_UNITS).read_text())
    groups = student_groups(recipe.adapter, recipe.tcfg, len(recipe.hidden_pairs))
    assert len(recipe.shrink_host_peaks) >= 3
    assert {g.name: recipe.kept[g.kind] * g.blocks for g in groups} == {n: len(kept) for n, kept in units.items()}
    assert any(kept != list(range(len(kept))) for kept in units.values())  # not merely the first units
    teacher = {f"lm.{n}": p.detach() for n, p in recipe.teacher.named_parameters()}
    expected = shrink_tensors(teacher, groups, {name: torch.tensor(kept) for name, kept in units.items()})
    student = dict(recipe.engine.module.named_parameters())
    for name, want in expected.items():
        torch.testing.assert_close(student[name].detach(), want, atol=1e-25, rtol=0)
    recipe.close()



def test_oneshot_calibration_scores_what_the_first_training_step_scores(tmp_path, monkeypatch):
    """A one-shot run's calibration is the training's micro-step on the first batches: one calibration
    step scores the units exactly as a HomoDistil run's step 1 does (fp32, world size 1, no dropout; two
    micro-batches, so that the gradient is their mean in both)."""
    from homodistil.pruning.pruner import Pruner  # noqa: PLC0415

    scored = []  # the scores each mask update reads
    update_masks = Pruner.update_masks
    monkeypatch.setattr(Pruner, "update_masks", lambda self, step: (
        scored.append({k: v.clone() for k, v in self.scores.items()}), update_masks(self, step))[1])
    common = ["pruning.metric=sensitivity", "deepspeed.gradient_accumulation_steps=2", "trainer.max_steps=1",
              "pruning.t_f=1"]
    run_inprocess(tiny_overrides(tmp_path / "oneshot") + common + [
        "pruning.schedule=oneshot", "pruning.calibration_steps=1"], train=False).close()
    run_inprocess(tiny_overrides(tmp_path / "cubic") + common).close()
    assert len(scored) == 2
    calibrated, trained = scored
    assert calibrated.keys() == trained.keys()
    for name, score in calibrated.items():
        assert score.abs().sum() > 0, name
        assert torch.equal(score, trained[name]), name

def test_teacher_partitioned_with_zero3_matches_replicated(tmp_path):
    replicated = run_inprocess(tiny_overrides(tmp_path / "r") + STEPS, train=False)
    partitioned = run_inprocess(tiny_overrides(tmp_path / "p") + STEPS + ["model.teacher_zero3=true"], train=False)
    batch = replicated._batch(0)
    a = teacher_outputs(replicated.teacher, "cls", batch, True, True, replicated.hidden_pairs, replicated.attention_pairs)
    b = teacher_outputs(partitioned.teacher, "cls", batch, True, True, partitioned.hidden_pairs,
                        partitioned.attention_pairs)
    assert not any(p.requires_grad for p in partitioned.teacher.module.parameters())
    assert all(p.numel() == 0 for p in partitioned.teacher.module.parameters())  # partitioned away
    for key in ("logits", "hidden", "attentions"):
        for x, y in zip(a[key] if key != "logits" else [a[key]], b[key] if key != "logits" else [b[key]]):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)
    replicated.close()
    partitioned.close()
    assert torch.nn.functional.linear is torch._C._nn.linear  # DeepSpeed's process-wide patch is undone


def test_bf16_trains_through_a_shrink(tmp_path):
    args = STEPS + ["deepspeed.bf16.enabled=true", "deepspeed.zero_optimization.stage=2", "pruning.shrink_interval=2"]
    run_inprocess(tiny_overrides(tmp_path / "bf16") + args).close()
    run_inprocess(tiny_overrides(tmp_path / "fp32") + STEPS + ["pruning.shrink_interval=2"]).close()
    bf16, fp32 = torch.tensor(losses(tmp_path / "bf16")), torch.tensor(losses(tmp_path / "fp32"))
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.02)  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("override,expected", [
    ("model.teacher=/no/such/teacher", "model.teacher: no such directory: /no/such/teacher"),
    ("data.source=/no/such/text.txt", "nor an existing path"),
    ("trainer.output_dir=/proc/homodistil", "trainer.output_dir '/proc/homodistil' is not writable"),
    ("pruning.sparsity.hidden=0.25", "must equal pruning.sparsity.hidden"),
    ("data.max_seq_length=1024", "data.max_seq_length (1024) is longer than the teacher's position embeddings "
                                 "allow (512 tokens)"),
])
def test_setup_errors_are_one_line(tmp_path, capsys, override, expected):
    code = main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path / "x"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and expected in err, err
    assert not (tmp_path / "x" / "cache").exists()  # stopped before any data preparation


def test_the_command_line_destroys_its_process_group_before_the_interpreter_exits(tmp_path):
    """`homodistil` / `python -m homodistil.cli` tear the process group down themselves: left to
    interpreter exit, gloo's threads can abort a run that succeeded (dist.shutdown_distributed)."""
    probe = ("import atexit, torch.distributed as dist\n"
             "atexit.register(lambda: print('process group at exit:', dist.is_initialized()))\n"
             "from homodistil.cli import run\n"
             "run()\n")
    argv = ["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path), *STEPS]
    # an in-process run before this test set these for pytest's own process group: a fresh one here
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process group at exit: False" in proc.stdout, proc.stdout[-2000:]
