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

_ROBERTA = {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
            "pad_token_id": 1}
KNOWN = {  # well-known hub teachers: config.json fields that differ from RobertaConfig's defaults
    "roberta-base": _ROBERTA,
    "roberta-large": {**_ROBERTA, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096},
}
ALIASES = {"FacebookAI/roberta-base": "roberta-base", "FacebookAI/roberta-large": "roberta-large"}


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
