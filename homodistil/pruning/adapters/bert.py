"""BERT (``model_type: bert``): groups, layer pairs, widths and export fix-ups.

Groups per layer ``l`` (prefix ``bert.encoder.layer.{l}.``):
- ``ffn``:       rows of ``intermediate.dense``, columns of ``output.dense``.
- ``attention``: per-head width, two groups: Q/K rows (``query``, ``key``) and V/O
                 (``value`` rows, ``attention.output.dense`` columns); ``num_heads`` blocks.
- ``hidden``:    one group for the residual stream: embedding columns, every LayerNorm,
                 every reader's columns and writer's rows, the MLM head transform.

BERT derives the head width as ``hidden_size / num_attention_heads``, and heads are kept, so
the hidden width is tied to the head width: ``hidden = heads × head_width``. The attention
and hidden sparsities must therefore be equal (checked at config time), and the model keeps
the teacher's attention scale ``1/sqrt(teacher head width)`` while training; export folds the
scale change into the query weights so the standard ``BertConfig`` computes the same.
"""
from __future__ import annotations

import math

import torch
from transformers import BertConfig, BertForMaskedLM

from ..groups import Group, MaskPoint, Slice
from ..schedule import kept_units
from . import AdapterError, register

_SELF = "bert.encoder.layer.{l}.attention.self."


def _lin(name: str, dim: int, bias: bool) -> tuple[Slice, ...]:
    return (Slice(f"{name}.weight", dim),) + ((Slice(f"{name}.bias", 0),) if bias else ())


def _norm(name: str) -> tuple[Slice, ...]:
    return (Slice(f"{name}.weight", 0), Slice(f"{name}.bias", 0))


class BertAdapter:
    model_type = "bert"
    mlm_head = "cls"  # maps the last hidden state to vocabulary logits
    objective = "mlm"

    def groups(self, config) -> list[Group]:
        heads, hidden = config.num_attention_heads, config.hidden_size
        groups = []
        hidden_slices = [
            Slice("bert.embeddings.word_embeddings.weight", 1),  # tied with the MLM decoder
            Slice("bert.embeddings.position_embeddings.weight", 1),
            Slice("bert.embeddings.token_type_embeddings.weight", 1),
            *_norm("bert.embeddings.LayerNorm"),
        ]
        hidden_norms = ["bert.embeddings.LayerNorm"]
        for l in range(config.num_hidden_layers):
            layer, attn = f"bert.encoder.layer.{l}.", _SELF.format(l=l)
            groups.append(Group(
                f"layer{l}.ffn", "ffn", config.intermediate_size,
                slices=_lin(layer + "intermediate.dense", 0, True) + _lin(layer + "output.dense", 1, False),
                points=(MaskPoint(layer + "intermediate.dense", "out"),)))
            groups.append(Group(
                f"layer{l}.qk", "attention", hidden, blocks=heads,
                slices=_lin(attn + "query", 0, True) + _lin(attn + "key", 0, True),
                points=(MaskPoint(attn + "query", "out"), MaskPoint(attn + "key", "out"))))
            groups.append(Group(
                f"layer{l}.vo", "attention", hidden, blocks=heads,
                slices=_lin(attn + "value", 0, True) + _lin(layer + "attention.output.dense", 1, False),
                points=(MaskPoint(attn + "value", "out"),)))
            hidden_slices += [
                *(Slice(attn + f"{m}.weight", 1) for m in ("query", "key", "value")),
                *_lin(layer + "attention.output.dense", 0, True), *_norm(layer + "attention.output.LayerNorm"),
                Slice(layer + "intermediate.dense.weight", 1),
                *_lin(layer + "output.dense", 0, True), *_norm(layer + "output.LayerNorm"),
            ]
            hidden_norms += [layer + "attention.output.LayerNorm", layer + "output.LayerNorm"]
        head = "cls.predictions.transform."
        hidden_slices += [*_lin(head + "dense", 0, True), Slice(head + "dense.weight", 1), *_norm(head + "LayerNorm")]
        hidden_norms.append(head + "LayerNorm")
        groups.append(Group("hidden", "hidden", hidden, slices=tuple(hidden_slices),
                            points=tuple(MaskPoint(n, "norm") for n in hidden_norms)))
        return groups

    def kept(self, config, sparsity: dict[str, float]) -> dict[str, int]:
        head_width = config.hidden_size // config.num_attention_heads
        head_kept = kept_units(head_width, sparsity["attention"])
        return {"ffn": kept_units(config.intermediate_size, sparsity["ffn"]),
                "attention": head_kept,
                "hidden": head_kept * config.num_attention_heads}

    def check_targets(self, config, sparsity: dict[str, float]) -> None:
        if sparsity["attention"] != sparsity["hidden"]:
            raise AdapterError(
                "BERT derives the head width from hidden_size / num_attention_heads and heads are kept, "
                f"so pruning.sparsity.attention ({sparsity['attention']}) must equal pruning.sparsity.hidden "
                f"({sparsity['hidden']})")

    def shrunk_config(self, teacher_config, kept: dict[str, int]) -> BertConfig:
        cfg = BertConfig.from_dict(teacher_config.to_dict())
        cfg.hidden_size = kept["hidden"]
        cfg.intermediate_size = kept["ffn"]
        assert cfg.hidden_size == kept["attention"] * cfg.num_attention_heads
        return cfg

    def set_dropout(self, config, p: float) -> None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = p

    def build(self, config, teacher_config) -> BertForMaskedLM:
        model = BertForMaskedLM(config)
        scale = self._teacher_scale(teacher_config)
        for layer in model.bert.encoder.layer:
            layer.attention.self.scaling = scale  # the teacher's 1/sqrt(d_head), see module doc
        return model

    def hidden_pairs(self, teacher_config) -> list[tuple[int, int]]:
        return [(k, k) for k in range(teacher_config.num_hidden_layers + 1)]

    def attention_pairs(self, teacher_config) -> list[tuple[int, int]]:
        return [(k, k) for k in range(teacher_config.num_hidden_layers)]

    def export_state(self, state, config, teacher_config):
        # scores = (q·k)·s_teacher must equal (q'·k)·s_standard  =>  q' = q · s_teacher / s_standard
        factor = self._teacher_scale(teacher_config) / (config.hidden_size // config.num_attention_heads) ** -0.5
        if math.isclose(factor, 1.0):
            return state
        state = dict(state)
        for l in range(config.num_hidden_layers):
            for part in ("weight", "bias"):
                key = _SELF.format(l=l) + f"query.{part}"
                state[key] = state[key] * factor
        return state

    @staticmethod
    def _teacher_scale(teacher_config) -> float:
        if teacher_config.hidden_size % teacher_config.num_attention_heads:
            raise AdapterError("teacher hidden_size is not a multiple of num_attention_heads")
        return (teacher_config.hidden_size // teacher_config.num_attention_heads) ** -0.5


register(BertAdapter())
