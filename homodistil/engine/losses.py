"""Distillation losses of DESIGN §1, computed in fp32 whatever the training precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from homodistil.config import LossConfig


class LossError(RuntimeError):
    """The model did not return what a configured loss needs."""


def prediction_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · KL(p_T ‖ p_S) at temperature τ, summed over the vocabulary, mean over positions.

    Logits (M, V) at the positions that are scored (the masked ones for MLM).
    """
    log_p_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def distill_losses(cfg: LossConfig, labels: torch.Tensor, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum ``loss``.

    ``student``/``teacher``: ``logits`` (M, V) at the M scored positions, ``hidden`` (list of (B, T, H_teacher) —
    the student's already projected), ``attentions`` (list of (B, heads, T, T)).
    labels (B, T): token ids at masked positions, -100 elsewhere; or (M,) the token ids at the scored
    positions already (a training step's ``targets``: no boolean indexing on the device).
    """
    terms: dict[str, torch.Tensor] = {}
    s_logits = student["logits"]  # (M, V)
    if cfg.alpha_lm:
        targets = labels if labels.dim() == 1 else labels[labels != -100]  # (M,)
        terms["lm"] = F.cross_entropy(s_logits.float(), targets)
    if cfg.alpha_pred:
        terms["kl"] = prediction_kl(s_logits, teacher["logits"], cfg.temperature)
    if cfg.alpha_hidden:
        terms["hidden"] = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student["hidden"], teacher["hidden"]))
    if cfg.alpha_attention:
        if not student["attentions"] or not teacher["attentions"]:
            raise LossError("the model returned no attention maps (sdpa attention returns none): "
                            "set model.attn_implementation=eager or loss.alpha_attention=0")
        terms["attention"] = sum(F.mse_loss(s.float(), t.float())
                                 for s, t in zip(student["attentions"], teacher["attentions"]))
    weights = {"lm": cfg.alpha_lm, "kl": cfg.alpha_pred, "hidden": cfg.alpha_hidden, "attention": cfg.alpha_attention}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms
