"""GPT-2 (``model_type: gpt2``): a pre-LayerNorm decoder with Conv1D layers.

``Conv1D`` stores its weight as (in, out), transposed against ``nn.Linear``: output units are
columns (dim 1), input units rows (dim 0). Groups per layer ``l`` (prefix ``transformer.h.{l}.``):
- ``ffn``:       columns of ``mlp.c_fc`` (and its bias), rows of ``mlp.c_proj``.
- ``attention``: per-head width, heads kept. ``attn.c_attn`` is fused: its output is
                 [q | k | v], each ``n_embd`` wide with the heads inside each third, so its
                 output dim has three parts: Q/K (parts 0 and 1) form one group, V (part 2)
                 with the rows of ``attn.c_proj`` the other; ``n_head`` blocks each.
- ``hidden``:    the residual stream: ``wte`` (tied with ``lm_head``; an untied ``lm_head`` too)
                 and ``wpe`` columns, ``ln_1``/``ln_2``/``ln_f``, every reader's input rows and
                 writer's output columns. The writers (embeddings, ``attn.c_proj``,
                 ``mlp.c_proj``) are masked as well as the norms: in a pre-norm model the
                 stream itself is read by the hidden-state loss, and must hold zeros at masked
                 units as the shrunk model holds none.

GPT-2 has no head-width config field (``head_dim = n_embd / n_head``), so it has BERT's tie
(``TiedHeadWidth``): attention and hidden sparsities equal, the teacher's attention scale
while training (``attn.scaling``, which also carries ``scale_attn_by_inverse_layer_idx``'s
``1/(l+1)`` and is what ``reorder_and_upcast_attn`` uses), folded into the query third of
``c_attn`` at export. With ``scale_attn_weights: false`` there is no head-width scale to fold.
"""
from __future__ import annotations

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from ..arch import ParamCounts
from ..groups import Group, MaskPoint, Slice
from ..masked import OutMasked, masked_linear
from . import AdapterError, Arch, register
from .common import TiedHeadWidth, norm, refuse_kv_heads

KNOWN = {"gpt2": {"model_type": "gpt2"}}  # well-known hub teachers: config.json fields beside GPT2Config's defaults
ALIASES = {"openai-community/gpt2": "gpt2"}


def _qkv(name: str, part: int) -> tuple[Slice, ...]:
    """Part ``part`` (0 q, 1 k, 2 v) of the fused ``c_attn``'s output units."""
    return Slice(f"{name}.weight", 1, part, 3), Slice(f"{name}.bias", 0, part, 3)


def _conv_out(name: str) -> tuple[Slice, ...]:
    """A Conv1D's output units: weight columns and bias."""
    return Slice(f"{name}.weight", 1), Slice(f"{name}.bias", 0)


class MaskedConv1D(OutMasked, Conv1D):
    """GPT-2's ``y = x W + b`` (W: (in, out), transposed vs ``nn.Linear``) with masked outputs 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_mask is None:
            return Conv1D.forward(self, x)
        return masked_linear(x, self.weight.t(), self.bias, self.keep(x.device))



class GPT2Adapter(TiedHeadWidth):
    model_type = "gpt2"
    objective = "causal"
    head = "lm_head"
    drop_ins = {Conv1D: MaskedConv1D}
    ffn_activations = 2  # GELU's input and output

    def tiny_config(self, vocab_size: int, pad_token_id: int, tiny) -> GPT2Config:
        refuse_kv_heads(self.model_type, tiny)
        # GPT-2's own bos/eos ids (50256) lie outside a small tokenizer's vocabulary
        return GPT2Config(vocab_size=vocab_size, n_embd=tiny.hidden_size, n_layer=tiny.num_hidden_layers,
                          n_head=tiny.num_attention_heads, n_inner=tiny.intermediate_size,
                          n_positions=tiny.max_position_embeddings, pad_token_id=pad_token_id,
                          bos_token_id=None, eos_token_id=None)

    def ffn_size(self, config) -> int:
        return config.n_inner or 4 * config.n_embd

    def longest_sequence(self, config) -> int:
        return config.n_positions

    def param_counts(self, a: Arch) -> ParamCounts:
        h, f, ha = a.hidden_size, a.intermediate_size, a.attn_width
        emb = a.vocab_size * h + a.max_position * h
        layer = 2 * h + (h * 3 * ha + 3 * ha) + (ha * h + h) + 2 * h + (h * f + f) + (f * h + h)
        head = 0 if a.tie_word_embeddings else a.vocab_size * h
        return ParamCounts(emb + a.num_layers * layer + 2 * h + head, emb, layer)  # + ln_f

    def backbone_params(self, a: Arch) -> None:
        return None

    def check_targets(self, config, sparsity: dict[str, float]) -> None:
        if config.add_cross_attention:
            raise AdapterError("gpt2 with add_cross_attention is not supported (no groups for crossattention)")
        super().check_targets(config, sparsity)

    def groups(self, config) -> list[Group]:
        heads, hidden = config.n_head, config.n_embd
        groups = []
        hidden_slices = [Slice("transformer.wte.weight", 1), Slice("transformer.wpe.weight", 1),
                         *norm("transformer.ln_f")]
        if not config.tie_word_embeddings:
            hidden_slices.append(Slice("lm_head.weight", 1))
        hidden_points = [MaskPoint("transformer.wte", "out"), MaskPoint("transformer.wpe", "out"),
                         MaskPoint("transformer.ln_f", "norm")]
        for l in range(config.n_layer):
            block = f"transformer.h.{l}."
            c_attn, attn_proj, c_fc, mlp_proj = (block + n for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj"))
            groups.append(Group(
                f"layer{l}.ffn", "ffn", self.ffn_size(config),
                slices=_conv_out(c_fc) + (Slice(mlp_proj + ".weight", 0),),
                points=(MaskPoint(c_fc, "out"),)))
            groups.append(Group(
                f"layer{l}.qk", "attention", hidden, blocks=heads,
                slices=_qkv(c_attn, 0) + _qkv(c_attn, 1),
                points=(MaskPoint(c_attn, "out", 0, 3), MaskPoint(c_attn, "out", 1, 3))))
            groups.append(Group(
                f"layer{l}.vo", "attention", hidden, blocks=heads,
                slices=_qkv(c_attn, 2) + (Slice(attn_proj + ".weight", 0),),
                points=(MaskPoint(c_attn, "out", 2, 3),)))
            hidden_slices += [
                *norm(block + "ln_1"), Slice(c_attn + ".weight", 0), *_conv_out(attn_proj),
                *norm(block + "ln_2"), Slice(c_fc + ".weight", 0), *_conv_out(mlp_proj),
            ]
            hidden_points += [MaskPoint(block + "ln_1", "norm"), MaskPoint(attn_proj, "out"),
                              MaskPoint(block + "ln_2", "norm"), MaskPoint(mlp_proj, "out")]
        groups.append(Group("hidden", "hidden", hidden, slices=tuple(hidden_slices), points=tuple(hidden_points)))
        return groups

    def arch(self, config) -> Arch:
        return Arch("gpt2", config.vocab_size, config.n_embd, config.n_layer, config.n_head, self.ffn_size(config),
                    config.n_positions, 0, tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
                    dropout=config.resid_pdrop)

    def shrunk_config(self, teacher_config, kept: dict[str, int]) -> GPT2Config:
        cfg = GPT2Config.from_dict(teacher_config.to_dict())
        cfg.n_embd = kept["hidden"]
        cfg.n_inner = kept["ffn"]
        assert cfg.n_embd == kept["attention"] * cfg.n_head
        return cfg

    def set_dropout(self, config, p: float) -> None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p

    def build(self, config, teacher_config) -> GPT2LMHeadModel:
        model = GPT2LMHeadModel(config)
        for l, block in enumerate(model.transformer.h):
            block.attn.scaling = self._scaling(teacher_config, l)  # the teacher's, see module doc
        return model

    def export_state(self, state, config, teacher_config):
        factor = self.scale_factor(config, teacher_config) if config.scale_attn_weights else 1.0
        if math.isclose(factor, 1.0):
            return state
        state, width = dict(state), config.n_embd
        for l in range(config.n_layer):
            key = f"transformer.h.{l}.attn.c_attn."
            state[key + "weight"] = state[key + "weight"].clone()
            state[key + "weight"][:, :width] *= factor  # (in, 3·width): the query third
            state[key + "bias"] = state[key + "bias"].clone()
            state[key + "bias"][:width] *= factor
        return state

    def _scaling(self, config, layer: int) -> float:
        """GPT2Attention's score scale for ``config`` at ``layer``."""
        scale = self.head_width(config) ** -0.5 if config.scale_attn_weights else 1.0
        return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale


register(GPT2Adapter())
