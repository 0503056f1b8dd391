"""The recipe on every supported family: distillation, ZeRO stages, a sharded ZeRO-3 teacher.

Tiny random-init models built from each family's own config class (``model.tiny.family``);
the MiniLM tokenizer serves every family. Adapter-level invariants (masked == shrunk, export
round trip) are in test_adapters.py; this file runs the whole recipe. With a random teacher
the hidden-state and KL terms grow from 0 as the student is pruned away from it, so "loss
goes down" is checked on the LM term (MLM or next-token cross-entropy).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from homodistil.engine import checkpoint

from conftest import tiny_overrides
from recipe_runs import losses, run_inprocess, run_torchrun

DECODERS = ("gpt2", "llama")
PRUNE = ["trainer.max_steps=10", "pruning.t_i=0", "pruning.t_f=6", "pruning.mask_interval=2",
         "pruning.shrink_interval=3", "optimizer.lr=3e-3"]
# Llama keeps its heads (rotary width): FFN and hidden only; 2 KV heads for 4 query heads (GQA).
FAMILY = {"bert": [], "roberta": [], "gpt2": [],
          "llama": ["pruning.sparsity.attention=0", "model.tiny.num_key_value_heads=2"]}


def _overrides(out, family: str) -> list[str]:
    return tiny_overrides(out, model__tiny__family=family) + PRUNE + FAMILY[family]


def _terms(out_dir, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", list(FAMILY))
def test_each_family_distills_shrinks_and_exports(tmp_path, family):
    recipe = run_inprocess(_overrides(tmp_path / "run", family) + ["trainer.export=true"])
    objective, kept = recipe.objective, recipe.kept
    recipe.close()
    assert objective == ("causal" if family in DECODERS else "mlm")
    lm = _terms(tmp_path / "run", "loss/lm")
    assert lm[-1] < lm[0] - 0.03, lm  # the LM term learns while the widths halve
    assert kept["ffn"] == 32 and kept["hidden"] == 16  # 64 -> 32, 32 -> 16: shrunk for real
    auto = AutoModelForCausalLM if family in DECODERS else AutoModelForMaskedLM
    exported = auto.from_pretrained(tmp_path / "run" / "export")  # plain transformers, no custom code
    assert exported.config.model_type == family and exported.config.hidden_size == 16
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * sum(
        p.numel() for p in auto.from_pretrained(tmp_path / "run" / "teacher").parameters())


def test_decoder_at_zero_2_and_3_world_size_2(tmp_path):
    """Llama (GQA) at world size 2: ZeRO-2 and ZeRO-3 give the same losses at every step,
    through the shrinks, and the next-token loss goes down."""
    for stage in (2, 3):
        run_torchrun(_overrides(tmp_path / f"z{stage}", "llama") + [f"deepspeed.zero_optimization.stage={stage}"])
    torch.testing.assert_close(losses(tmp_path / "z3"), losses(tmp_path / "z2"), atol=1e-5, rtol=1e-5)
    lm = _terms(tmp_path / "z3", "loss/lm")
    assert lm[-1] < lm[0] - 0.03, lm
    masks = [checkpoint.load_run_state(root, checkpoint.find_latest(root), 0)[0]["masks"]
             for root in (tmp_path / "z2" / "checkpoints", tmp_path / "z3" / "checkpoints")]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def _sharded_teacher(tmp_path, family: str) -> str:
    """A tiny teacher of ``family`` saved as a multi-file safetensors checkpoint."""
    recipe = run_inprocess(_overrides(tmp_path / "seed", family), train=False)
    recipe.close()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seed" / "teacher")
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    recipe.tokenizer.save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) > 2  # really sharded
    return str(out)


def test_zero3_teacher_from_sharded_checkpoint_matches_replicated(tmp_path):
    """World size 2: a Llama teacher loaded shard by shard into ZeRO-3 partitions (and offloaded
    to CPU memory) gives the same losses at every step, through the shrinks, as the replicated one."""
    teacher = _sharded_teacher(tmp_path, "llama")
    base = [f"model.teacher={teacher}", "deepspeed.zero_optimization.stage=2", *PRUNE, *FAMILY["llama"][:1]]
    run_torchrun(tiny_overrides(tmp_path / "rep") + base)
    run_torchrun(tiny_overrides(tmp_path / "z3") + base + ["model.teacher_zero3=true", "model.teacher_offload=true"])
    torch.testing.assert_close(losses(tmp_path / "z3"), losses(tmp_path / "rep"), atol=1e-6, rtol=1e-6)
