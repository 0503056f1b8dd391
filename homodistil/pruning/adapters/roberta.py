"""RoBERTa (``model_type: roberta``): BERT's adapter (``bert.py``) under RoBERTa's names.

The encoder is ``roberta.*`` with BERT's layer layout; the MLM head is ``lm_head`` (``dense``,
``layer_norm``, decoder tied to the word embeddings). RoBERTa numbers positions from
``padding_idx + 1`` (padding tokens take position ``padding_idx``), so a model for sequences
of n tokens needs ``n + padding_idx + 1`` position rows.
"""
from __future__ import annotations

from transformers import RobertaConfig, RobertaForMaskedLM

from . import register
from .bert import BertAdapter


class RobertaAdapter(BertAdapter):
    model_type = "roberta"
    base = "roberta"
    head = "lm_head"
    head_transform = ("lm_head.dense", "lm_head.layer_norm")
    config_class, model_class = RobertaConfig, RobertaForMaskedLM

    @staticmethod
    def positions(tokens: int, pad_token_id: int) -> int:
        return tokens + pad_token_id + 1


register(RobertaAdapter())
