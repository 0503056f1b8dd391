"""The numbers of a transformer LM that memory and FLOPs depend on.

Plain data, no torch: ``homodistil plan`` imports it without importing torch; the adapters
(:meth:`homodistil.pruning.adapters.Adapter.arch`) fill it from their family's configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ParamCounts(NamedTuple):
    """Parameters of an LM with its head (an adapter's :meth:`Adapter.param_counts`)."""

    total: int  # tied weights counted once
    embedding_lookup: int  # token/position/type embeddings: looked up, not multiplied
    layer: int  # one transformer layer


@dataclass(frozen=True)
class Arch:
    """The few numbers of a transformer LM that memory and FLOPs depend on (``homodistil plan``,
    ``perf/mfu``); an adapter reads them from its family's config (:meth:`Adapter.arch`)."""

    family: str  # "bert" (BERT / RoBERTa MLM), "gpt2", "llama" (also Mistral, Qwen2)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    head_dim: int | None = None  # llama: explicit; others: hidden // heads
    num_kv_heads: int | None = None
    tie_word_embeddings: bool = True
    dropout: float = 0.1

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_width

    @property
    def kv_width(self) -> int:
        return (self.num_kv_heads or self.num_heads) * self.head_width
