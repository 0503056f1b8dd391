"""The recipe on every supported family: distillation, ZeRO stages, a sharded ZeRO-3 teacher.

Tiny random-init models built from each family's own config class (``model.tiny.family``);
the MiniLM tokenizer serves every family. Adapter-level invariants (masked == shrunk,
export round trip) are in test_adapters.py; this file runs the whole recipe.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import tiny_overrides
from recipe_runs import losses, run_inprocess, run_torchrun

DECODERS = ["gpt2", "llama"]
FAMILIES = ["bert", "roberta", *DECODERS]
PRUNE = ["pruning.t_i=0", "pruning.t_f=6", "pruning.mask_interval=2", "pruning.shrink_interval=3"]


def _auto(family):
    return AutoModelForCausalLM if family in DECODERS else AutoModelForMaskedLM


def _sharded_teacher(tmp_path, family: str) -> str:
    """A tiny teacher of ``family`` saved as a multi-file safetensors checkpoint."""
    recipe = run_inprocess(tiny_overrides(tmp_path / "seed", model__tiny__family=family), train=False)
    recipe.close()
    model = _auto(family).from_pretrained(tmp_path / "seed" / "teacher")
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    recipe.tokenizer.save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) > 2  # really sharded
    return str(out)


@pytest.mark.parametrize("family", DECODERS[-1:])
def test_zero3_teacher_from_sharded_checkpoint_matches_replicated(tmp_path, family):
    """World size 2: a ZeRO-3 (and CPU-offloaded) teacher loaded shard by shard gives the same
    losses at every step, through the shrinks, as the replicated teacher."""
    teacher = _sharded_teacher(tmp_path, family)
    base = ["trainer.max_steps=6", f"model.teacher={teacher}", "deepspeed.zero_optimization.stage=2", *PRUNE]
    run_torchrun(tiny_overrides(tmp_path / "rep") + base)
    run_torchrun(tiny_overrides(tmp_path / "z3") + base + ["model.teacher_zero3=true", "model.teacher_offload=true"])
    torch.testing.assert_close(losses(tmp_path / "z3"), losses(tmp_path / "rep"), atol=1e-6, rtol=1e-6)
