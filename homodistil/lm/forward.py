"""The forward pass at scored positions, shared by training, teacher preparation and evaluation."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM


def auto_lm_class(objective: str):
    """The Auto class that loads a plain LM of ``objective`` ("mlm" or "causal", an adapter's)."""
    return {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}[objective]


def at_positions(hidden: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` (B, T, H) at the scored positions -> (M, H), in row-major order.

    ``scored``: a bool (B, T) mask, or the (M,) int64 flat positions (``data.batches.scored_positions``),
    which a training step passes: a gather of known size, where a mask on a device would make the
    host wait for the device to count its positions.
    """
    if scored.dtype == torch.bool:
        return hidden[scored]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)


def scored_forward(lm: nn.Module, head: str, input_ids, attention_mask, scored, want_hidden, want_attentions):
    """The LM with its head (submodule ``head``) applied at the ``scored`` positions only (a bool
    (B, T) mask or (M,) flat positions, :func:`at_positions`).

    The vocabulary projection is the largest GEMM of a small LM (T·H·V per sequence) and the
    losses read it at the masked positions only, so logits are (M, V).
    """
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=want_hidden, output_attentions=want_attentions)
    return {"logits": lm.get_submodule(head)(at_positions(out.last_hidden_state, scored)),
            "hidden_states": out.hidden_states, "attentions": list(out.attentions or [])}


def head_name(lm: nn.Module) -> str:
    """The LM head's submodule name of a Hugging Face ``*For{MaskedLM,CausalLM}`` model: its one
    top-level child besides the base model (``cls`` for BERT, ``lm_head`` for the others)."""
    heads = [name for name, child in lm.named_children() if child is not lm.base_model]
    if len(heads) != 1:
        raise ValueError(f"{type(lm).__name__}: expected one head beside the base model, found {heads}")
    return heads[0]
