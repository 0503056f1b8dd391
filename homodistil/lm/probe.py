"""Held-out KL(teacher ‖ student) and MLM loss during training (``trainer.eval_every``).

The blocks and their masks are fixed (the run's held-out split, ``BlockBatches.heldout_batches``),
and the teacher's log-probabilities at the masked positions are computed once, so every
evaluation of the run — and every run with the same seed — measures the same thing. The
figures are those of ``homodistil.eval.heldout.heldout_metrics`` on an exported model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from homodistil.config import ConfigError

from .forward import scored_forward


class HeldoutProbe:
    """``probe(student_lm) -> {"kl", "mlm_loss", "masked_accuracy", "teacher_mlm_loss", "teacher_masked_accuracy",
    "scored_tokens"}``: nats per scored token (masked tokens for MLM, next tokens for a causal LM), and how many
    tokens were scored (a difference of a few hundredths of a nat needs thousands of them to be seen)."""

    def __init__(self, data, teacher, head: str, max_blocks: int, batch_size: int, device: torch.device):
        self.head, self.device = head, device
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in data.heldout_batches(batch_size, max_blocks)]
        if not self.batches:
            raise ConfigError("no held-out blocks: set data.heldout_fraction > 0 to use trainer.eval_every")
        module = getattr(teacher, "module", teacher)  # a ZeRO-3 engine or the model itself
        self.teacher_logp = [self._logp(module, b) for b in self.batches]  # each (M_b, V), M_b masked tokens
        self.count = sum(int((b["labels"] != -100).sum()) for b in self.batches)
        self.teacher_mlm_loss = sum(float(F.nll_loss(t, b["labels"][b["labels"] != -100], reduction="sum"))
                                    for t, b in zip(self.teacher_logp, self.batches)) / self.count
        self.teacher_accuracy = sum(float((t.argmax(-1) == b["labels"][b["labels"] != -100]).sum())
                                    for t, b in zip(self.teacher_logp, self.batches)) / self.count

    @torch.no_grad()
    def _logp(self, lm, batch) -> torch.Tensor:
        scored = batch["labels"] != -100  # (B, T)
        out = scored_forward(lm, self.head, batch["input_ids"], batch["attention_mask"], scored, False, False)
        return F.log_softmax(out["logits"].float(), dim=-1)  # (M, V)

    def __call__(self, lm: torch.nn.Module) -> dict[str, float]:
        was_training = lm.training
        lm.eval()  # no dropout: the figures are deterministic and the training RNG stream is untouched
        kl = loss = correct = 0.0
        for batch, t_logp in zip(self.batches, self.teacher_logp):
            logp = self._logp(lm, batch)
            labels = batch["labels"][batch["labels"] != -100]
            kl += float(F.kl_div(logp, t_logp, log_target=True, reduction="sum"))
            loss += float(F.nll_loss(logp, labels, reduction="sum"))
            correct += float((logp.argmax(-1) == labels).sum())
        lm.train(was_training)
        return {"kl": kl / self.count, "mlm_loss": loss / self.count, "masked_accuracy": correct / self.count,
                "teacher_mlm_loss": self.teacher_mlm_loss, "teacher_masked_accuracy": self.teacher_accuracy,
                "scored_tokens": self.count}
