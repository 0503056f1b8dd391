"""Resuming anywhere: damaged checkpoints are set aside, a run resumes at another world size.

Integrity (world size 1, in this process): a flipped byte in a model shard and a truncated
optimizer shard are found through the checkpoint's manifest, reported in one line each,
renamed aside, and the run resumes from the checkpoint before them and ends exactly like an
uninterrupted run.
"""
from __future__ import annotations

import json

import torch

from homodistil.cli import main
from homodistil.engine import checkpoint
from homodistil.engine.export import _full_state

import fault_harness as H
from conftest import tiny_overrides

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
