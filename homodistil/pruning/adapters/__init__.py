"""Architecture adapters, registered by Hugging Face ``model_type``.

An adapter is the only code that knows a model's attribute names. It declares the prunable
groups and where their masks act, the teacher↔student layer pairs for the hidden-state and
attention losses, how pruned widths map to a model config, and what export must fix up.

Registered: ``bert``, ``roberta`` (masked LM); ``gpt2``, ``llama``, ``mistral``, ``qwen2``
(causal LM). ``docs/adapters.md`` says what each prunes and what it refuses.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..arch import Arch, ParamCounts
from ..groups import Group


class AdapterError(ValueError):
    """The model cannot be pruned or exported as asked (printed as one line)."""


class Adapter(Protocol):
    model_type: str
    objective: str  # "mlm" (AutoModelForMaskedLM) or "causal" (AutoModelForCausalLM)
    head: str  # name of the submodule that maps the last hidden state to vocabulary logits
    drop_ins: dict[type, type]  # maskable drop-ins of the family's own layers (pruning.masked has torch's)
    ffn_activations: int  # (tokens, FFN width) tensors one FFN keeps for the backward pass (cost model)

    def tiny_config(self, vocab_size: int, pad_token_id: int, tiny):
        """A small random-init config of this family from ``tiny`` (a ``config.TinyTeacherConfig``);
        AdapterError where ``tiny`` asks for what the family cannot be."""

    def longest_sequence(self, config) -> int | None:
        """The longest sequence the model's position embeddings cover (None: no table to overrun)."""

    def param_counts(self, arch: Arch) -> ParamCounts:
        """Exact parameter counts of the family's LM with its head at ``arch``."""

    def backbone_params(self, arch: Arch) -> int | None:
        """The papers' parameter count where it is not the LM's (BERT: no MLM head, with pooler), else None."""

    def groups(self, config) -> list[Group]:
        """Prunable groups of a model with this config (names relative to the model)."""

    def quanta(self, config, final: dict[str, float], multiple: dict[str, int]) -> dict[str, int]:
        """Per kind, the step in units per block that its kept width moves in: the width multiples asked for
        (``pruning.width_multiple``) combined with this architecture's own constraints, for a teacher config
        pruned to per-kind ``final`` sparsities (``schedule.aligned_quantum``: the one place they combine)."""

    def kept(self, config, sparsity: dict[str, float], quanta: dict[str, int] | None = None) -> dict[str, int]:
        """Units kept per block for each kind, at per-kind sparsities, for a teacher config; each a multiple of
        its kind's quantum (:meth:`quanta`; None: any width the architecture allows)."""

    def check_targets(self, config, sparsity: dict[str, float]) -> None:
        """Raise AdapterError if the final widths cannot be exported as a standard model."""

    def shrunk_config(self, teacher_config, kept: dict[str, int]):
        """The model config with the kept widths."""

    def arch(self, config) -> Arch:
        """The numbers of ``config`` that memory and FLOPs depend on."""

    def set_dropout(self, config, p: float) -> None:
        """Set every dropout probability of ``config`` to ``p``."""

    def build(self, config, teacher_config) -> nn.Module:
        """A (randomly initialised) LM of ``config`` that computes like the teacher's family
        at pruned widths (e.g. keeps the teacher's attention scale)."""

    def hidden_pairs(self, teacher_config) -> list[tuple[int, int]]:
        """(teacher, student) indices into ``output_hidden_states`` for the hidden-state loss."""

    def attention_pairs(self, teacher_config) -> list[tuple[int, int]]:
        """(teacher, student) indices into ``output_attentions`` for the attention loss."""

    def export_state(self, state: dict[str, torch.Tensor], config, teacher_config) -> dict[str, torch.Tensor]:
        """Fix a shrunk state dict up so that a plain ``from_pretrained`` model computes the same."""


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def get_adapter(model_type: str) -> Adapter:
    if model_type not in _REGISTRY:
        raise AdapterError(
            f"no adapter for model_type '{model_type}' (supported: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[model_type]


def supported() -> list[str]:
    return sorted(_REGISTRY)


def known_config(name: str) -> dict | None:
    """The ``config.json`` fields (with ``model_type``) of a well-known hub teacher, by id or alias;
    None if unknown. Each adapter file lists its family's (``KNOWN``, ``ALIASES``)."""
    return KNOWN_CONFIGS.get(ALIASES.get(name, name))


from . import bert, gpt2, llama, roberta  # noqa: E402  (each registers itself)

KNOWN_CONFIGS: dict[str, dict] = {**bert.KNOWN, **roberta.KNOWN, **gpt2.KNOWN, **llama.KNOWN}
ALIASES: dict[str, str] = {**bert.ALIASES, **roberta.ALIASES, **gpt2.ALIASES, **llama.ALIASES}
