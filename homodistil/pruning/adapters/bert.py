"""BERT (``model_type: bert``): groups, layer pairs, widths and export fix-ups.

Groups per layer ``l`` (prefix ``bert.encoder.layer.{l}.``):
- ``ffn``:       rows of ``intermediate.dense``, columns of ``output.dense``.
- ``attention``: per-head width, two groups: Q/K rows (``query``, ``key``) and V/O
                 (``value`` rows, ``attention.output.dense`` columns); ``num_heads`` blocks.
- ``hidden``:    one group for the residual stream: embedding columns, every LayerNorm,
                 every reader's columns and writer's rows, the MLM head transform.

BERT derives the head width as ``hidden_size / num_attention_heads``, and heads are kept, so
the hidden width is tied to the head width: ``hidden = heads × head_width`` (``TiedHeadWidth``:
equal attention and hidden sparsities, the teacher's attention scale while training, folded
into the query weights at export). RoBERTa (``roberta.py``) is this adapter with other names.
"""
from __future__ import annotations

import math

from transformers import BertConfig, BertForMaskedLM

from ..arch import ParamCounts
from ..groups import Group, MaskPoint, Slice
from . import Arch, register
from .common import TiedHeadWidth, lin, norm, refuse_kv_heads

KNOWN = {  # well-known hub teachers: config.json fields that differ from BertConfig's defaults
    "bert-base-uncased": {"model_type": "bert"},
    "bert-base-cased": {"model_type": "bert", "vocab_size": 28996},
    "bert-large-uncased": {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "intermediate_size": 4096},
}
ALIASES = {"google-bert/bert-base-uncased": "bert-base-uncased", "google-bert/bert-base-cased": "bert-base-cased",
           "google-bert/bert-large-uncased": "bert-large-uncased"}


class BertAdapter(TiedHeadWidth):
    model_type = "bert"
    objective = "mlm"
    base = "bert"  # the encoder's attribute
    head = "cls"  # maps the last hidden state to vocabulary logits
    drop_ins: dict[type, type] = {}  # only torch layers
    ffn_activations = 2  # GELU's input and output
    head_transform = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm")
    config_class, model_class = BertConfig, BertForMaskedLM

    def tiny_config(self, vocab_size: int, pad_token_id: int, tiny):
        refuse_kv_heads(self.model_type, tiny)
        return self.config_class(vocab_size=vocab_size, hidden_size=tiny.hidden_size,
                                 num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
                                 intermediate_size=tiny.intermediate_size, pad_token_id=pad_token_id,
                                 max_position_embeddings=self.positions(tiny.max_position_embeddings, pad_token_id))

    @staticmethod
    def positions(tokens: int, pad_token_id: int) -> int:
        """Position-embedding rows for sequences of ``tokens``."""
        return tokens

    def longest_sequence(self, config) -> int:
        return config.max_position_embeddings - self.positions(0, config.pad_token_id or 0)

    def ffn_size(self, config) -> int:
        return config.intermediate_size

    def groups(self, config) -> list[Group]:
        heads, hidden = config.num_attention_heads, config.hidden_size
        emb = f"{self.base}.embeddings."
        groups = []
        hidden_slices = [
            Slice(emb + "word_embeddings.weight", 1),  # tied with the MLM decoder
            Slice(emb + "position_embeddings.weight", 1),
            Slice(emb + "token_type_embeddings.weight", 1),
            *norm(emb + "LayerNorm"),
        ]
        hidden_norms = [emb + "LayerNorm"]
        for l in range(config.num_hidden_layers):
            layer = f"{self.base}.encoder.layer.{l}."
            attn = layer + "attention.self."
            groups.append(Group(
                f"layer{l}.ffn", "ffn", config.intermediate_size,
                slices=lin(layer + "intermediate.dense", 0, True) + lin(layer + "output.dense", 1, False),
                points=(MaskPoint(layer + "intermediate.dense", "out"),)))
            groups.append(Group(
                f"layer{l}.qk", "attention", hidden, blocks=heads,
                slices=lin(attn + "query", 0, True) + lin(attn + "key", 0, True),
                points=(MaskPoint(attn + "query", "out"), MaskPoint(attn + "key", "out"))))
            groups.append(Group(
                f"layer{l}.vo", "attention", hidden, blocks=heads,
                slices=lin(attn + "value", 0, True) + lin(layer + "attention.output.dense", 1, False),
                points=(MaskPoint(attn + "value", "out"),)))
            hidden_slices += [
                *(Slice(attn + f"{m}.weight", 1) for m in ("query", "key", "value")),
                *lin(layer + "attention.output.dense", 0, True), *norm(layer + "attention.output.LayerNorm"),
                Slice(layer + "intermediate.dense.weight", 1),
                *lin(layer + "output.dense", 0, True), *norm(layer + "output.LayerNorm"),
            ]
            hidden_norms += [layer + "attention.output.LayerNorm", layer + "output.LayerNorm"]
        dense, head_norm = self.head_transform
        hidden_slices += [*lin(dense, 0, True), Slice(dense + ".weight", 1), *norm(head_norm)]
        hidden_norms.append(head_norm)
        groups.append(Group("hidden", "hidden", hidden, slices=tuple(hidden_slices),
                            points=tuple(MaskPoint(n, "norm") for n in hidden_norms)))
        return groups

    def arch(self, config) -> Arch:
        return Arch("bert", config.vocab_size, config.hidden_size, config.num_hidden_layers,
                    config.num_attention_heads, config.intermediate_size, config.max_position_embeddings,
                    config.type_vocab_size, tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
                    dropout=max(config.hidden_dropout_prob, config.attention_probs_dropout_prob))

    @staticmethod
    def _head(a: Arch) -> int:
        """The MLM head: transform, LayerNorm, decoder bias (and decoder weight unless tied)."""
        h, V = a.hidden_size, a.vocab_size
        return (h * h + h) + 2 * h + V + (0 if a.tie_word_embeddings else V * h)

    def param_counts(self, a: Arch) -> ParamCounts:
        h, f, ha = a.hidden_size, a.intermediate_size, a.attn_width
        emb = a.vocab_size * h + a.max_position * h + a.type_vocab_size * h
        layer = (2 * (h * ha + ha) + (h * ha + ha) + (ha * h + h) + 2 * h  # Q, K, V, O, LayerNorm
                 + (h * f + f) + (f * h + h) + 2 * h)  # FFN, LayerNorm
        return ParamCounts(emb + 2 * h + a.num_layers * layer + self._head(a), emb, layer)  # + embedding LayerNorm

    def backbone_params(self, a: Arch) -> int:
        """``BertModel``'s count: without the MLM head, with the pooler (BERT-base "110M" = 109,482,240)."""
        return self.param_counts(a).total - self._head(a) + (a.hidden_size * a.hidden_size + a.hidden_size)

    def shrunk_config(self, teacher_config, kept: dict[str, int]):
        cfg = self.config_class.from_dict(teacher_config.to_dict())
        cfg.hidden_size = kept["hidden"]
        cfg.intermediate_size = kept["ffn"]
        assert cfg.hidden_size == kept["attention"] * cfg.num_attention_heads
        return cfg

    def set_dropout(self, config, p: float) -> None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = p

    def build(self, config, teacher_config):
        model = self.model_class(config)
        scale = self.head_width(teacher_config) ** -0.5
        for layer in model.base_model.encoder.layer:
            layer.attention.self.scaling = scale  # the teacher's 1/sqrt(d_head), see module doc
        return model

    def export_state(self, state, config, teacher_config):
        factor = self.scale_factor(config, teacher_config)
        if math.isclose(factor, 1.0):
            return state
        state = dict(state)
        for l in range(config.num_hidden_layers):
            for part in ("weight", "bias"):
                key = f"{self.base}.encoder.layer.{l}.attention.self.query.{part}"
                state[key] = state[key] * factor
        return state


register(BertAdapter())
