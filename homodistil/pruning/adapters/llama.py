"""Llama and the models that share its layout (``model_type``: ``llama``, ``mistral``, ``qwen2``).

A pre-RMSNorm decoder with rotary embeddings, grouped-query attention and a gated MLP
``down(silu(gate(x)) · up(x))``. Groups per layer ``l`` (prefix ``model.layers.{l}.``):
- ``ffn``:    rows of ``mlp.gate_proj`` and ``mlp.up_proj``, columns of ``mlp.down_proj``
              (biases where ``mlp_bias``). The mask acts on ``up_proj``: silu(g)·0 = 0.
- ``hidden``: the residual stream (the Minitron width axis): ``embed_tokens`` columns, every
              RMSNorm (``input_layernorm``, ``post_attention_layernorm``, ``norm``; masked
              RMSNorms take the mean square over live units only), the input columns of
              ``q/k/v_proj`` and ``gate/up_proj``, the output rows of ``o_proj`` and
              ``down_proj``, and ``lm_head`` columns unless it is tied to the embeddings. The
              writers (embeddings, ``o_proj``, ``down_proj``) are masked too, so the stream
              (read by the hidden-state loss) holds zeros at masked units. Qwen2's q/k/v biases
              index heads, not the stream: nothing of theirs is pruned.

Attention is not pruned: ``pruning.sparsity.attention`` must be 0 (``check_targets``). Why:
- per-head width pruning changes ``head_dim``, and the rotary frequencies are
  ``theta^(-2i/head_dim)``: a narrower head rotates its surviving pairs at other speeds, so
  the masked and shrunk models differ and no config of a standard model reproduces the
  student (the kept pairs would also have to stay (i, i + head_dim/2)-paired);
- pruning whole KV groups (a KV head with its query heads) is exportable, but it changes the
  number of heads, and the attention-map loss pairs teacher and student heads one to one;
- Minitron's Llama-3.1-8B → 4B width recipe prunes hidden (4096 → 3072) and FFN
  (14336 → 9216) and keeps every head, which is what this adapter does.
The config keeps the teacher's ``head_dim`` explicitly (Llama and Mistral have the field;
Qwen2 reads it with ``getattr``), so the hidden width is free of the head width, the
attention scale ``1/sqrt(head_dim)`` and the rotary frequencies do not change, and the
exported config loads with plain ``AutoModelForCausalLM``. One constraint remains:
``LlamaConfig`` (transformers 5) refuses to save or load a ``hidden_size`` that is not a
multiple of ``num_attention_heads``, so the kept hidden width is rounded to such a multiple
(for every family here, so that the three behave alike): Minitron's 3072 = 32 × 96 is one.
``quanta`` combines it with ``pruning.width_multiple.hidden`` (lcm): at 8, SmolLM2's 9 heads
keep multiples of 72 (its 432 = 72 × 6 is never a multiple of 64: lcm(9, 64) = 576, the full width).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from ..arch import ParamCounts
from ..groups import Group, MaskPoint, Slice
from ..masked import NormMasked
from ..schedule import aligned_quantum, kept_units
from . import AdapterError, Arch, register
from .common import SameDepth, lin, norm

KNOWN = {  # well-known hub teachers: config.json fields that differ from LlamaConfig's defaults
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "intermediate_size": 14336, "max_position_embeddings": 8192, "head_dim": 128,
                                   "tie_word_embeddings": False},
}
ALIASES = {"Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B", "Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
           "meta-llama/Llama-3.1-8B": "meta-llama/Meta-Llama-3-8B",
           "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Meta-Llama-3-8B"}


class MaskedRMSNorm(NormMasked):
    """Llama-style RMSNorm (``weight · x / sqrt(mean(x²) + eps)``, mean square in fp32). The
    Llama, Mistral and Qwen2 RMSNorms share the formula and attribute names."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., d)
        live = None if self.live is None else self.live.to(x.device)
        h = x.float() if live is None else x.float().index_select(-1, live)
        weight = self.weight if live is None else self.weight.index_select(0, live)
        y = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)
        return y if live is None else y.new_zeros((*x.shape[:-1], x.shape[-1])).index_copy(-1, live, y)



class LlamaAdapter(SameDepth):
    objective = "causal"
    head = "lm_head"
    ffn_activations = 4  # SwiGLU: gate, up, the activation, the product

    def __init__(self, model_type: str, rms_norm: type):
        self.model_type = model_type
        self.drop_ins = {rms_norm: MaskedRMSNorm}

    def tiny_config(self, vocab_size: int, pad_token_id: int, tiny):
        kv_heads = tiny.num_key_value_heads or tiny.num_attention_heads
        if tiny.num_attention_heads % kv_heads:
            raise AdapterError("model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads")
        if (tiny.hidden_size // tiny.num_attention_heads) % 2:
            raise AdapterError(f"model.tiny: {self.model_type}'s rotary embeddings need an even head width "
                               "(hidden_size / num_attention_heads)")
        return AutoConfig.for_model(
            self.model_type, vocab_size=vocab_size, hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=tiny.max_position_embeddings, pad_token_id=pad_token_id)

    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def groups(self, config) -> list[Group]:
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        o_bias = self.model_type == "llama" and config.attention_bias  # Qwen2: q/k/v only; Mistral: none
        groups = []
        hidden_slices = [Slice("model.embed_tokens.weight", 1), *norm("model.norm", bias=False)]
        if not config.tie_word_embeddings:
            hidden_slices.append(Slice("lm_head.weight", 1))
        hidden_points = [MaskPoint("model.embed_tokens", "out"), MaskPoint("model.norm", "norm")]
        for l in range(config.num_hidden_layers):
            layer = f"model.layers.{l}."
            attn, mlp = layer + "self_attn.", layer + "mlp."
            groups.append(Group(
                f"layer{l}.ffn", "ffn", config.intermediate_size,
                slices=lin(mlp + "gate_proj", 0, mlp_bias) + lin(mlp + "up_proj", 0, mlp_bias)
                + lin(mlp + "down_proj", 1, False),
                points=(MaskPoint(mlp + "up_proj", "out"),)))
            hidden_slices += [
                *norm(layer + "input_layernorm", bias=False),
                *(Slice(attn + f"{m}_proj.weight", 1) for m in "qkv"), *lin(attn + "o_proj", 0, o_bias),
                *norm(layer + "post_attention_layernorm", bias=False),
                Slice(mlp + "gate_proj.weight", 1), Slice(mlp + "up_proj.weight", 1),
                *lin(mlp + "down_proj", 0, mlp_bias),
            ]
            hidden_points += [MaskPoint(layer + "input_layernorm", "norm"), MaskPoint(attn + "o_proj", "out"),
                              MaskPoint(layer + "post_attention_layernorm", "norm"),
                              MaskPoint(mlp + "down_proj", "out")]
        groups.append(Group("hidden", "hidden", config.hidden_size, slices=tuple(hidden_slices),
                            points=tuple(hidden_points)))
        return groups

    def quanta(self, config, final: dict[str, float], multiple: dict[str, int]) -> dict[str, int]:
        heads = config.num_attention_heads  # the hidden width is heads × (its units per head): see module doc
        return {"ffn": aligned_quantum(config.intermediate_size, 1, multiple["ffn"], final["ffn"]),
                "attention": 1,  # not pruned (check_targets)
                "hidden": aligned_quantum(config.hidden_size // heads, heads, multiple["hidden"], final["hidden"])}

    def kept(self, config, sparsity: dict[str, float], quanta: dict[str, int] | None = None) -> dict[str, int]:
        heads, q = config.num_attention_heads, quanta or dict.fromkeys(("ffn", "attention", "hidden"), 1)
        return {"ffn": kept_units(config.intermediate_size, sparsity["ffn"], q["ffn"]),
                "attention": kept_units(self.head_dim(config), sparsity["attention"], q["attention"]),
                "hidden": kept_units(config.hidden_size // heads, sparsity["hidden"], q["hidden"]) * heads}

    def check_targets(self, config, sparsity: dict[str, float]) -> None:
        if config.hidden_size % config.num_attention_heads:
            raise AdapterError(f"{self.model_type}: hidden_size {config.hidden_size} is not a multiple of "
                               f"num_attention_heads {config.num_attention_heads} (the pruned width is kept one)")
        if sparsity["attention"] > 0:
            raise AdapterError(
                f"{self.model_type}: pruning.sparsity.attention must be 0 (got {sparsity['attention']}): a narrower "
                f"head changes the rotary frequencies, and fewer heads would break the one-to-one attention loss; "
                f"prune ffn and hidden (heads kept, as Minitron does)")

    def longest_sequence(self, config) -> None:
        return None  # rotary positions: no table to overrun

    def param_counts(self, a: Arch) -> ParamCounts:
        h, f = a.hidden_size, a.intermediate_size
        emb = a.vocab_size * h
        layer = h * a.attn_width + 2 * h * a.kv_width + a.attn_width * h + 3 * h * f + 2 * h  # Q, K, V, O, MLP, norms
        head = 0 if a.tie_word_embeddings else a.vocab_size * h
        return ParamCounts(emb + a.num_layers * layer + h + head, emb, layer)  # + the final norm

    def backbone_params(self, a: Arch) -> None:
        return None

    def arch(self, config) -> Arch:
        return Arch("llama", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                    config.num_attention_heads, config.intermediate_size, config.max_position_embeddings, 0,
                    head_dim=self.head_dim(config),
                    num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
                    tie_word_embeddings=bool(config.tie_word_embeddings), dropout=config.attention_dropout)

    def shrunk_config(self, teacher_config, kept: dict[str, int]):
        cfg = type(teacher_config).from_dict(teacher_config.to_dict())
        cfg.head_dim = self.head_dim(teacher_config)  # explicit: no longer hidden_size / heads
        cfg.hidden_size = kept["hidden"]
        cfg.intermediate_size = kept["ffn"]
        return cfg

    def set_dropout(self, config, p: float) -> None:
        config.attention_dropout = p  # the family has no other dropout

    def build(self, config, teacher_config):
        assert self.head_dim(config) == self.head_dim(teacher_config), "heads are not pruned"
        return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)

    def export_state(self, state, config, teacher_config):
        return state  # same head_dim: same attention scale and rotary frequencies


RMS_NORMS = {"llama": LlamaRMSNorm, "mistral": MistralRMSNorm, "qwen2": Qwen2RMSNorm}  # the family's model types
for _model_type, _rms_norm in RMS_NORMS.items():
    register(LlamaAdapter(_model_type, _rms_norm))
