"""Adapters for BERT, RoBERTa, GPT-2 and the Llama family on tiny random-init models (CPU, fp32).

For each family: masked vs shrunk students give the same logits, projected hidden states and
attention maps (the recipe's shrink, without DeepSpeed); an exported directory loads with plain
``AutoModelFor{MaskedLM,CausalLM}.from_pretrained`` and gives the masked student's logits;
targets that cannot be exported are refused with one line. Tolerance 1e-5 as in test_recipe.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig,
                          MistralConfig, Qwen2Config, RobertaConfig)
from transformers.pytorch_utils import Conv1D

from homodistil.engine.export import export_dense
from homodistil.engine.models import Student, student_groups
from homodistil.pruning.adapters import AdapterError, get_adapter, supported
from homodistil.pruning.groups import KINDS, Group, MaskPoint, Slice, live_numel, shrink_tensors
from homodistil.pruning.masked import apply_masks, make_maskable
from homodistil.pruning.importance import Sensitivity
from homodistil.pruning.pruner import Pruner

V = 50  # vocabulary
TIED = {"ffn": 0.5, "attention": 0.5, "hidden": 0.5}  # head width tied to hidden: equal sparsities
WIDTH = {"ffn": 0.5, "attention": 0.0, "hidden": 0.25}  # llama family: heads kept, hidden free

CONFIGS = {
    "bert": (lambda: BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=24, max_position_embeddings=40), TIED),
    "roberta": (lambda: RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=24, pad_token_id=1, max_position_embeddings=40 + 2), TIED),
    "gpt2": (lambda: GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_inner=24, n_positions=40,
                                bos_token_id=None, eos_token_id=None), TIED),
    "gpt2-untied-layer-scaled": (lambda: GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_inner=None, n_positions=40, bos_token_id=None,
        eos_token_id=None, tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True), TIED),
    "llama-gqa": (lambda: LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40), WIDTH),
    "llama-tied-biases": (lambda: LlamaConfig(
        vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        head_dim=4, max_position_embeddings=40, tie_word_embeddings=True, attention_bias=True, mlp_bias=True), WIDTH),
    "qwen2-gqa-tied": (lambda: Qwen2Config(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=40,
                                           tie_word_embeddings=True), WIDTH),
    "mistral-head-dim": (lambda: MistralConfig(
        vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=40, sliding_window=None), WIDTH),
}


def _config(name):
    make, sparsity = CONFIGS[name]
    config = make()
    config._attn_implementation = "eager"  # attention maps are compared too
    config.initializer_range = 0.2  # sharp attention: the default's near-uniform softmax would hide a wrong scale
    return get_adapter(config.model_type), config, sparsity


def _random_masks(groups: list[Group], kept: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    masks = {}
    for g in groups:
        mask = torch.zeros(g.blocks, g.block_size, dtype=torch.bool)
        for b in range(g.blocks):
            mask[b, torch.randperm(g.block_size, generator=gen)[:kept[g.kind]]] = True
        masks[g.name] = mask.view(-1)
    return masks


def _batch(config):
    gen = torch.Generator().manual_seed(1)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(2, V, (2, 12), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0  # right padding
    ids[1, -3:] = pad
    return ids, attention_mask


def _student(adapter, config, teacher_config):
    pairs = adapter.hidden_pairs(teacher_config)
    return Student(adapter.build(config, teacher_config), pairs, teacher_config.hidden_size, adapter.head).eval()


def _forward(student, ids, attention_mask):
    with torch.no_grad():
        out = student(ids, attention_mask, attention_mask.bool(), True, True)
    return {"logits": out["logits"], "hidden": torch.stack(out["hidden"]), "attentions": torch.stack(out["attentions"])}


def _masked_student(name):
    """A student of the family with random masks at the family's target sparsities."""
    adapter, config, sparsity = _config(name)
    torch.manual_seed(0)
    student = _student(adapter, config, config)
    with torch.no_grad():
        for p in student.proj:  # not the identity: a masked unit that leaked into the stream would count
            p.weight.normal_()
    groups = student_groups(adapter, config, len(student.proj))
    make_maskable(student, groups, adapter.drop_ins)
    masks = _random_masks(groups, adapter.kept(config, sparsity), torch.Generator().manual_seed(2))
    apply_masks(student, groups, masks)
    return adapter, config, student, groups, masks


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_equals_shrunk(name):
    adapter, config, student, groups, masks = _masked_student(name)
    ids, attention_mask = _batch(config)
    masked = _forward(student, ids, attention_mask)
    params = {n: p.detach() for n, p in student.named_parameters()}
    keep = {n: m.nonzero().squeeze(1) for n, m in masks.items()}
    kept = {g.kind: int(masks[g.name].view(g.blocks, -1)[0].sum()) for g in groups}
    small_config = adapter.shrunk_config(config, kept)
    small_config._attn_implementation = "eager"
    small = _student(adapter, small_config, config)
    shrunk = shrink_tensors(params, groups, keep)
    with torch.no_grad():
        for n, p in small.named_parameters():
            p.copy_(shrunk[n])
    assert sum(p.numel() for p in small.parameters()) == live_numel(
        {n: tuple(p.shape) for n, p in params.items()}, groups, masks)
    out = _forward(small, ids, attention_mask)
    assert small.lm.config.hidden_size < config.hidden_size
    for key in masked:
        torch.testing.assert_close(out[key], masked[key], atol=1e-5, rtol=1e-4, msg=key)
    assert masked["logits"].abs().max() > 0.1  # a real signal, not a vacuous zero


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(tmp_path, name):
    adapter, config, student, groups, masks = _masked_student(name)
    ids, attention_mask = _batch(config)
    params = {n: p.detach() for n, p in student.named_parameters()}
    meta = {"teacher_config": config.to_dict(), "kept": adapter.kept(config, dict.fromkeys(KINDS, 0.0)),
            "n_proj": len(student.proj)}
    export_dense(params, masks, meta, tmp_path)
    auto = AutoModelForMaskedLM if adapter.objective == "mlm" else AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        exported = model(input_ids=ids, attention_mask=attention_mask).logits
        expected = student.lm(input_ids=ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-4)
    kept = {g.kind: int(masks[g.name].view(g.blocks, -1)[0].sum()) for g in groups}
    c = model.config
    assert (c.hidden_size, c.num_attention_heads) == (kept["hidden"], config.num_attention_heads)
    if adapter.model_type == "gpt2":
        assert c.n_inner == kept["ffn"]
        assert type(model.transformer.h[0].attn.c_attn) is Conv1D  # no custom code
    else:
        assert c.intermediate_size == kept["ffn"]
    if adapter.objective == "causal" and adapter.model_type != "gpt2":
        assert c.head_dim == adapter.head_dim(config) and c.num_key_value_heads == config.num_key_value_heads
        assert model.model.layers[0].self_attn.head_dim == adapter.head_dim(config)
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert c.tie_word_embeddings == config.tie_word_embeddings
    out_emb = model.get_output_embeddings().weight
    assert (out_emb.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == config.tie_word_embeddings


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama-gqa", "qwen2-gqa-tied", "mistral-head-dim"])
def test_groups_cover_every_pruned_dimension(name):
    """Every parameter dimension of a hidden, FFN or fused-QKV width is in exactly one group."""
    adapter, config, _ = _config(name)
    model = adapter.build(config, config)
    params = dict(model.named_parameters())
    groups = adapter.groups(config)
    units: dict[tuple[str, int], int] = {}
    for g in groups:
        for s in g.slices:
            assert s.param in params, (g.name, s)
            units[(s.param, s.dim)] = units.get((s.param, s.dim), 0) + g.size
    ffn = adapter.ffn_size(config) if adapter.model_type == "gpt2" else config.intermediate_size
    widths = {config.hidden_size, ffn, 3 * config.hidden_size}
    heads_width = {("q_proj.weight", 0), ("q_proj.bias", 0), ("o_proj.weight", 1)}  # may equal hidden: not pruned
    for name_, p in params.items():
        for dim, size in enumerate(p.shape):
            if size in widths and (name_.rsplit(".", 2)[-2] + "." + name_.rsplit(".", 1)[-1], dim) not in heads_width:
                assert units.get((name_, dim)) == size, (name_, dim, size)
    for (param, dim), n in units.items():
        assert params[param].shape[dim] == n, (param, dim)


@pytest.mark.parametrize("name,sparsity,match", [
    ("bert", {"ffn": 0.5, "attention": 0.5, "hidden": 0.25}, "must equal pruning.sparsity.hidden"),
    ("roberta", {"ffn": 0.5, "attention": 0.25, "hidden": 0.5}, "must equal pruning.sparsity.hidden"),
    ("gpt2", {"ffn": 0.5, "attention": 0.5, "hidden": 0.25}, "must equal pruning.sparsity.hidden"),
    ("llama-gqa", {"ffn": 0.5, "attention": 0.25, "hidden": 0.25}, "pruning.sparsity.attention must be 0"),
    ("qwen2-gqa-tied", {"ffn": 0.5, "attention": 0.1, "hidden": 0.0}, "rotary"),
])
def test_check_targets_refuses_unexportable_targets(name, sparsity, match):
    adapter, config, _ = _config(name)
    with pytest.raises(AdapterError, match=match) as err:
        adapter.check_targets(config, sparsity)
    assert "\n" not in str(err.value)


def test_check_targets_accepts_the_minitron_shape():
    """Llama-3.1-8B → 4B width (hidden 4096 → 3072, FFN 14336 → 9216, heads kept) is a valid target."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    adapter = get_adapter("llama")
    sparsity = {"ffn": 1 - 9216 / 14336, "attention": 0.0, "hidden": 0.25}
    adapter.check_targets(config, sparsity)
    kept = adapter.kept(config, sparsity)
    small = adapter.shrunk_config(config, kept)
    assert (small.hidden_size, small.intermediate_size, small.head_dim) == (3072, 9216, 128)
    assert (small.num_attention_heads, small.num_key_value_heads) == (32, 8)


def test_gpt2_cross_attention_is_refused():
    with pytest.raises(AdapterError, match="add_cross_attention"):
        get_adapter("gpt2").check_targets(GPT2Config(add_cross_attention=True), TIED)


def test_longest_sequence_is_the_position_table_less_its_offset():
    """BERT: the table; RoBERTa: past its padding index; GPT-2: n_positions; rotary (Llama family): no table."""
    assert get_adapter("bert").longest_sequence(BertConfig(max_position_embeddings=40)) == 40
    assert get_adapter("roberta").longest_sequence(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert get_adapter("gpt2").longest_sequence(GPT2Config(n_positions=64)) == 64
    assert get_adapter("llama").longest_sequence(LlamaConfig()) is None


def test_known_configs_belong_to_their_adapters():
    from homodistil.pruning.adapters import KNOWN_CONFIGS, known_config

    assert known_config("FacebookAI/roberta-large") is KNOWN_CONFIGS["roberta-large"]
    assert known_config("meta-llama/Llama-3.1-8B")["num_key_value_heads"] == 8
    assert known_config("no/such-model") is None
    assert {c["model_type"] for c in KNOWN_CONFIGS.values()} == {"bert", "roberta", "gpt2", "llama"}


def test_unknown_model_type_lists_every_supported_one():
    with pytest.raises(AdapterError) as err:
        get_adapter("mamba")
    assert str(err.value) == ("no adapter for model_type 'mamba' "
                              "(supported: bert, gpt2, llama, mistral, qwen2, roberta)")
    assert supported() == ["bert", "gpt2", "llama", "mistral", "qwen2", "roberta"]


def _fused_group_pair():
    """Two groups sharing one fused dim: ``a`` owns parts 0 and 1 of w's rows, ``b`` part 2."""
    a = Group("a", "attention", 4, slices=(Slice("w", 0, 0, 3), Slice("w", 0, 1, 3)), points=(MaskPoint("m", "out"),))
    b = Group("b", "attention", 4, slices=(Slice("w", 0, 2, 3), Slice("v", 1)), points=(MaskPoint("m", "out"),))
    return a, b


def test_shrink_and_live_numel_of_a_fused_dimension():
    a, b = _fused_group_pair()
    w, v = torch.arange(36.0).view(12, 3), torch.arange(8.0).view(2, 4)
    keep = {"a": torch.tensor([1, 3]), "b": torch.tensor([0, 2])}
    out = shrink_tensors({"w": w, "v": v}, [a, b], keep)
    assert torch.equal(out["w"], w[[1, 3, 5, 7, 8, 10]]) and torch.equal(out["v"], v[:, [0, 2]])
    masks = {"a": torch.tensor([0, 1, 0, 1], dtype=torch.bool), "b": torch.tensor([1, 0, 1, 0], dtype=torch.bool)}
    assert live_numel({"w": (12, 3), "v": (2, 4)}, [a, b], masks) == 6 * 3 + 2 * 2


def test_pruner_scores_a_fused_dimension_by_segment():
    a, b = _fused_group_pair()
    torch.manual_seed(3)
    w, gw, v, gv = torch.randn(12, 3), torch.randn(12, 3), torch.randn(2, 4), torch.randn(2, 4)
    pruner = Pruner([a, b], lambda step: {"attention": 2}, importance=Sensitivity())
    pruner.observe({"w": (w, gw), "v": (v, gv)})
    rows = (w * gw).abs().sum(1)
    torch.testing.assert_close(pruner.scores["a"], rows[0:4] + rows[4:8])
    torch.testing.assert_close(pruner.scores["b"], rows[8:12] + (v * gv).abs().sum(0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_conv1d_parts_match_the_shrunk_layer(monkeypatch, backend):
    """A fused Conv1D masked per part (q, k, v) equals the shrunk Conv1D scattered back, with
    gradients, under the reference and the Triton kernels (interpreted on CPU)."""
    from homodistil.pruning.adapters.gpt2 import MaskedConv1D

    monkeypatch.setenv("HOMODISTIL_KERNELS", backend)
    torch.manual_seed(4)
    conv = Conv1D(9, 6)  # nx 6 -> nf 3 parts of 3
    with torch.no_grad():
        conv.bias.normal_()
    masked = MaskedConv1D.wrap(conv)
    q, v = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    masked.set_mask(q, 0, 3)
    masked.set_mask(v, 2, 3)
    live = torch.cat([q, torch.ones(3, dtype=torch.bool), v])
    assert torch.equal(masked.out_mask, live)
    x = torch.randn(2, 5, 6)
    y = masked(x)
    y.backward(torch.ones_like(y))
    grads = conv.weight.grad.clone(), conv.bias.grad.clone()
    conv.weight.grad = conv.bias.grad = None
    idx = live.nonzero().squeeze(1)
    ref = x @ conv.weight[:, idx] + conv.bias[idx]  # the shrunk layer
    torch.testing.assert_close(y[..., idx], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[..., ~live], torch.zeros_like(y[..., ~live]))
    ref.sum().backward()
    torch.testing.assert_close(grads[0][:, idx], conv.weight.grad[:, idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][idx], conv.bias.grad[idx], atol=1e-5, rtol=1e-5)
    assert not grads[0][:, ~live].any() and not grads[1][~live].any()


def test_recipe_distills_and_shrinks_a_roberta_teacher(tmp_path):
    """The MLM recipe end to end on a tiny RoBERTa teacher: the student shrinks to the target
    widths, the loss goes down, and the export loads as a plain RobertaForMaskedLM."""
    from conftest import tiny_overrides
    from recipe_runs import losses, run_inprocess

    args = ["model.tiny.family=roberta", "trainer.max_steps=20", "pruning.t_f=4", "pruning.shrink_interval=2",
            "trainer.export=true"]
    recipe = run_inprocess(tiny_overrides(tmp_path / "run") + args)
    recipe.close()
    assert recipe.tcfg.model_type == "roberta" and recipe.adapter.head == "lm_head"
    assert recipe.kept == {"ffn": 32, "attention": 4, "hidden": 16}  # half of 64 / 8 / 32
    trajectory = losses(tmp_path / "run")
    assert len(trajectory) == 20 and sum(trajectory[-3:]) < sum(trajectory[4:7])  # trains on after the shrink
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "export")
    assert type(model).__name__ == "RobertaForMaskedLM" and model.config.hidden_size == 16


@pytest.mark.parametrize("overrides,expected", [
    (["model.tiny.num_key_value_heads=2"], "num_key_value_heads applies to grouped-query families, not bert"),
    (["model.tiny.family=llama", "model.tiny.num_key_value_heads=3"], "must be a multiple of model.tiny.num_key"),
    (["model.tiny.family=llama", "model.tiny.hidden_size=36"], "even head width"),
    (["model.tiny.family=llama"], "llama: pruning.sparsity.attention must be 0 (got 0.5)"),  # tiny.yaml prunes heads
    (["model.tiny.family=gpt2", "pruning.sparsity.hidden=0.25"], "must equal pruning.sparsity.hidden"),
])
def test_tiny_family_errors_are_one_line_at_setup(tmp_path, capsys, overrides, expected):
    from homodistil.cli import main

    from conftest import tiny_overrides

    assert main(["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path / "x"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    assert not (tmp_path / "x" / "cache").exists()  # refused before any data work
