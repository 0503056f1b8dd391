"""Pieces the adapters share: slice helpers, layer pairs, and the heads × head-width tie of the
architectures that derive the head width as ``hidden_size / num_attention_heads`` (BERT,
RoBERTa, GPT-2: no head-width config field)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..groups import Slice
from ..schedule import aligned_quantum, kept_units
from . import AdapterError


def lin(name: str, dim: int, bias: bool) -> tuple[Slice, ...]:
    """A linear layer's weight along ``dim`` and, for rows (dim 0), its bias."""
    return (Slice(f"{name}.weight", dim),) + ((Slice(f"{name}.bias", 0),) if bias else ())


def norm(name: str, bias: bool = True) -> tuple[Slice, ...]:
    return (Slice(f"{name}.weight", 0),) + ((Slice(f"{name}.bias", 0),) if bias else ())


def refuse_kv_heads(model_type: str, tiny) -> None:
    """A family without grouped-query attention: ``model.tiny.num_key_value_heads`` must stay unset."""
    if tiny.num_key_value_heads is not None:
        raise AdapterError(f"model.tiny.num_key_value_heads applies to grouped-query families, not {model_type}")


class SameDepth:
    """Teacher and student have the same layers: layer k pairs with layer k."""

    def hidden_pairs(self, teacher_config) -> list[tuple[int, int]]:
        return [(k, k) for k in range(teacher_config.num_hidden_layers + 1)]  # embeddings + every layer

    def attention_pairs(self, teacher_config) -> list[tuple[int, int]]:
        return [(k, k) for k in range(teacher_config.num_hidden_layers)]


class TiedHeadWidth(SameDepth, ABC):
    """Heads are kept and their width shrinks; with no head-width field, ``hidden = heads × width``.

    So the attention and hidden sparsities must be equal (checked at config time), and the
    student keeps the teacher's attention scale ``1/sqrt(teacher head width)`` while training;
    export folds the scale change into the query weights (``export_state``).
    """

    model_type: str

    @abstractmethod
    def ffn_size(self, config) -> int:
        """FFN units per layer."""

    def quanta(self, config, final: dict[str, float], multiple: dict[str, int]) -> dict[str, int]:
        # hidden = heads × head width: the hidden multiple is asked of the head width, lcm(heads, m) / heads per head
        head = aligned_quantum(self.head_width(config), config.num_attention_heads, multiple["hidden"],
                               final["attention"])
        return {"ffn": aligned_quantum(self.ffn_size(config), 1, multiple["ffn"], final["ffn"]),
                "attention": head, "hidden": head}

    def kept(self, config, sparsity: dict[str, float], quanta: dict[str, int] | None = None) -> dict[str, int]:
        q = quanta or dict.fromkeys(("ffn", "attention"), 1)
        head_kept = kept_units(self.head_width(config), sparsity["attention"], q["attention"])
        return {"ffn": kept_units(self.ffn_size(config), sparsity["ffn"], q["ffn"]),
                "attention": head_kept,
                "hidden": head_kept * config.num_attention_heads}

    def check_targets(self, config, sparsity: dict[str, float]) -> None:
        self.head_width(config)
        if sparsity["attention"] != sparsity["hidden"]:
            raise AdapterError(
                f"{self.model_type} derives the head width from hidden_size / num_attention_heads and heads are "
                f"kept, so pruning.sparsity.attention ({sparsity['attention']}) must equal pruning.sparsity.hidden "
                f"({sparsity['hidden']})")

    @staticmethod
    def head_width(config) -> int:
        if config.hidden_size % config.num_attention_heads:
            raise AdapterError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                               f"{config.num_attention_heads}")
        return config.hidden_size // config.num_attention_heads

    def scale_factor(self, config, teacher_config) -> float:
        """``s_teacher / s_standard``: scores = (q·k)·s_teacher must equal (q'·k)·s_standard,
        so export multiplies the query by this factor."""
        return (self.head_width(config) / self.head_width(teacher_config)) ** 0.5
