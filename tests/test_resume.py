"""Resuming anywhere: damaged checkpoints are set aside, a run resumes at another world size.

Integrity (world size 1, in this process): a flipped byte in a model shard and a truncated
optimizer shard are found through the checkpoint's manifest, reported in one line each,
renamed aside, and the run resumes from the checkpoint before them and ends exactly like an
uninterrupted run.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from homodistil.cli import main
from homodistil.engine import checkpoint
from homodistil.engine.export import _full_state

import fault_harness as H
from conftest import tiny_overrides
from recipe_runs import REPO

INTEGRITY = ["trainer.max_steps=8", "pruning.t_f=8", "pruning.mask_interval=2", "pruning.shrink_interval=4",
             "trainer.save_every=2", "model.dropout=0.1", "deepspeed.zero_optimization.stage=2"]


def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_exactly_from_the_one_before(tmp_path, capsys):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["distill", "configs/tiny.yaml", *tiny_overrides(out), *INTEGRITY]
    assert main([*args, "trainer.keep_checkpoints=4"]) == 0
    assert checkpoint.complete_tags(root) == [f"step0000000{s}" for s in (2, 4, 6, 8)]
    manifest = json.loads((root / "step00000008" / checkpoint.MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in (root / "step00000008").iterdir()
                                      if p.name not in (checkpoint.MANIFEST, checkpoint.COMPLETE))
    weights = _full_state(root, "step00000008")
    pruner = torch.load(root / "step00000008" / checkpoint.PRUNER, weights_only=False)
    losses = H._losses(out)

    model = root / "step00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    model.write_bytes(bytes(data))
    optim = root / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = optim.stat().st_size
    optim.write_bytes(optim.read_bytes()[: size // 2])
    capsys.readouterr()

    # relaunched with keep_checkpoints=1: the checkpoint it resumes from (4) must survive its saves
    assert main([*args, "trainer.keep_checkpoints=1"]) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "damaged" in line] == [
        f"damaged checkpoint {model}: checksum mismatch: renamed {root / 'step00000008'} to "
        f"{root / 'step00000008.damaged'}; falling back to step00000006",
        f"damaged checkpoint {optim}: {size // 2} bytes, the manifest says {size}: renamed "
        f"{root / 'step00000006'} to {root / 'step00000006.damaged'}; falling back to step00000004",
    ], printed
    assert "resumed from step 4 (step00000004)" in printed
    assert checkpoint.complete_tags(root) == ["step00000004", "step00000008"]
    assert (root / "step00000008.damaged" / model.name).read_bytes() == bytes(data)  # kept as found
    assert (root / "step00000006.damaged" / optim.name).stat().st_size == size // 2
    assert H._equal(_full_state(root, "step00000008"), weights)
    assert H._equal(torch.load(root / "step00000008" / checkpoint.PRUNER, weights_only=False), pruner)
    assert H._losses(out) == losses


# ---------------------------------------------------------------------------------------------
# another world size (pre-built data: the same global batch is the same data at any world size)
# ---------------------------------------------------------------------------------------------

# 8 steps, dropout off; masks at 2, 4, 6, 8, shrinks at 4 and 8, checkpoints at 3, 6 and 8:
# resuming from 6 carries shrunk widths, masks and importance state across the mask update
# and shrink at 8. Global batch 4: micro-batch 4 at world size 1, 2 at world size 2.
RESIZE = ["trainer.max_steps=8", "pruning.t_f=8", "pruning.mask_interval=2", "pruning.shrink_interval=4",
          "trainer.save_every=3", "model.dropout=0.0"]
MICRO = {1: 4, 2: 2}
FROM = "step00000006"


def resize_job(out, stage: int, world: int) -> list[str]:
    return tiny_overrides(out) + RESIZE + [f"deepspeed.zero_optimization.stage={stage}",
                                           f"deepspeed.train_micro_batch_size_per_gpu={MICRO[world]}"]


def run(out, stage: int, world: int, overrides=()):
    """The resize job at ``world`` (1: this process, 2: torchrun); returns its logged losses."""
    args = [*resize_job(out, stage, world), *overrides]
    if world == 1:
        assert main(["distill", "configs/tiny.yaml", *args]) == 0
    else:
        proc = H.launch(args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return H._losses(out)


def copy_checkpoint(source, out, tag: str = FROM) -> None:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / checkpoint.LATEST).write_text(tag)


def close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_resumes_at_another_world_size_like_an_uninterrupted_run_there(tmp_path, stage):
    """World size 2 -> 1 and 1 -> 2: from step 6 on, the losses (to 1e-5), the masks and the
    final weights (to 1e-5) are an uninterrupted run's at the new world size."""
    ref = {w: run(tmp_path / f"ws{w}", stage, w) for w in (1, 2)}
    for saved, resumed in ((2, 1), (1, 2)):
        out = tmp_path / f"ws{saved}to{resumed}"
        copy_checkpoint(tmp_path / f"ws{saved}", out)
        losses = run(out, stage, resumed)
        assert [s for s, _ in losses] == [7, 8], losses  # resumed after step 6
        reference = dict(ref[resumed])
        torch.testing.assert_close(torch.tensor([v for _, v in losses]), torch.tensor([reference[s] for s, _ in losses]),
                                   atol=1e-5, rtol=0)
        final = {w: tmp_path / name / "checkpoints" for w, name in ((0, out.name), (1, f"ws{resumed}"))}
        pa, pb = (torch.load(final[w] / "step00000008" / checkpoint.PRUNER, weights_only=False) for w in (0, 1))
        assert H._equal(pa["masks"], pb["masks"])
        assert close(_full_state(final[0], "step00000008"), _full_state(final[1], "step00000008"))
        meta = checkpoint.read_meta(final[0], "step00000008")
        assert meta["world_size"] == resumed and meta["kept"] == checkpoint.read_meta(final[1], "step00000008")["kept"]


def test_another_global_batch_or_a_streamed_run_at_another_world_size_is_one_line(tmp_path, capsys):
    from types import SimpleNamespace

    from homodistil.config import ConfigError, load_config
    from homodistil.engine.recipe import Recipe

    args = ["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path / "run"), "trainer.max_steps=1", "pruning.t_f=1"]
    assert main(args) == 0  # global batch 4 (micro-batch 4, world size 1)
    capsys.readouterr()
    assert main([*args, "deepspeed.train_micro_batch_size_per_gpu=2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (err,) = [line for line in err.splitlines() if line.startswith("homodistil: error: ")]
    assert err == (f"homodistil: error: {tmp_path / 'run' / 'checkpoints' / 'step00000001'} was saved with a global "
                   "batch of 4 (micro-batch x gradient accumulation x world size), this run has 2: at world size 1 set "
                   "deepspeed.train_micro_batch_size_per_gpu x deepspeed.gradient_accumulation_steps to 4, or use a new "
                   "trainer.output_dir"), err

    # a streamed checkpoint of world size 2 met by one process (the check runs before any file is read)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*tiny_overrides(tmp_path / "s"), "data.streaming=true",
                                                       "deepspeed.train_micro_batch_size_per_gpu=4"])
    stub = SimpleNamespace(cfg=cfg, world=1, ckpt_root=tmp_path / "s" / "checkpoints")
    meta = {"world_size": 2, "zero_stage": 2, "global_batch": 4}
    with pytest.raises(ConfigError) as err:
        Recipe._world_change(stub, "step00000006", meta)
    assert str(err.value) == (f"{tmp_path / 's' / 'checkpoints' / 'step00000006'}: a streamed run resumes at the world "
                              "size it was saved with (2), not 1 (each rank's place in the stream is its own): relaunch "
                              "with 2 processes, or train on pre-built blocks (data.streaming=false), which resume at "
                              "any world size")


def test_a_checkpoint_from_other_pruning_settings_is_one_line(tmp_path, capsys):
    """A checkpoint whose student widths are not those the config's schedule has at its step (here: another
    pruning.width_multiple, as a checkpoint of an older version has) stops with one line, before any file is read."""
    args = ["distill", "configs/tiny.yaml", "trainer.max_steps=8", "pruning.t_f=8", "pruning.shrink_interval=2",
            "trainer.save_every=4"]
    assert main([*args, *tiny_overrides(tmp_path / "run")]) == 0  # the FFN (64) shrinks in multiples of 4
    out = tmp_path / "again"
    copy_checkpoint(tmp_path / "run", out, "step00000004")  # mid-schedule
    meta = checkpoint.read_meta(out / "checkpoints", "step00000004")
    capsys.readouterr()
    assert main([*args, *tiny_overrides(out), "pruning.width_multiple.ffn=16"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("homodistil: error: ")]
    assert line.startswith(f"homodistil: error: {out / 'checkpoints' / 'step00000004'} holds a student "
                           f"of widths {meta['kept']} at step 4, where this config's schedule has "), line
    assert main([*args, *tiny_overrides(out)]) == 0  # the settings it was made with resume
    assert "resumed from step 4" in capsys.readouterr().out
