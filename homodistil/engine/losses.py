"""Distillation losses of DESIGN §1, computed in fp32 whatever the training precision (the vocabulary-sized
terms in registers, by ``kernels.lm_losses``, where its Triton kernel runs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from homodistil.config import LossConfig
from homodistil.kernels.lm_losses import lm_losses


class LossError(RuntimeError):
    """The model did not return what a configured loss needs."""


def distill_losses(cfg: LossConfig, labels: torch.Tensor, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum ``loss``.

    ``student``/``teacher``: ``logits`` (M, V) at the M scored positions, ``hidden`` (list of (B, T, H_teacher) —
    the student's already projected), ``attentions`` (list of (B, heads, T, T)).
    labels (B, T): token ids at masked positions, -100 elsewhere; or (M,) the token ids at the scored
    positions already (a training step's ``targets``: no boolean indexing on the device).
    """
    terms: dict[str, torch.Tensor] = {}
    loss = 0.0
    if cfg.alpha_lm or cfg.alpha_pred:  # the (M, V) terms, fused into one kernel on CUDA (kernels.lm_losses)
        targets = labels if labels.dim() == 1 else labels[labels != -100]  # (M,)
        loss, lm, kl = lm_losses(student["logits"], teacher.get("logits"), targets, cfg.alpha_lm, cfg.alpha_pred,
                                 cfg.temperature)
        terms.update({k: v for k, v in (("lm", lm), ("kl", kl)) if v is not None})
    if cfg.alpha_hidden:
        terms["hidden"] = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student["hidden"], teacher["hidden"]))
    if cfg.alpha_attention:
        if not student["attentions"] or not teacher["attentions"]:
            raise LossError("the model returned no attention maps (sdpa attention returns none): "
                            "set model.attn_implementation=eager or loss.alpha_attention=0")
        terms["attention"] = sum(F.mse_loss(s.float(), t.float())
                                 for s, t in zip(student["attentions"], teacher["attentions"]))
    for key, weight in (("hidden", cfg.alpha_hidden), ("attention", cfg.alpha_attention)):  # the order of old
        if key in terms:
            loss = loss + weight * terms[key]
    terms["loss"] = loss
    return terms
