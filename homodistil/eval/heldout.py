"""Teacher–student prediction KL and MLM loss on held-out text, from exported model dirs.

The held-out blocks are the run's own (its batch source's held-out part, masked identically
for every model), so the figures compare like with like.
"""
from __future__ import annotations

import torch
from homodistil.lm.forward import auto_lm_class, head_name
from homodistil.lm.probe import HeldoutProbe


def heldout_metrics(model_dirs: dict[str, str], teacher_dir: str, data, *, batch_size: int = 16,
                    max_blocks: int = 128, objective: str = "mlm") -> dict[str, dict[str, float]]:
    """Per model: ``mlm_loss``, ``masked_accuracy`` and their count ``scored_tokens`` at the scored tokens of ``data``'s
    held-out blocks (masked tokens for MLM, next tokens for a causal LM; ``data`` from
    ``homodistil.data.batches.from_config``, the run's own), and ``kl_to_teacher`` =
    KL(p_teacher ‖ p_model) there (nats per token, τ = 1) — the training-time
    :class:`HeldoutProbe`, applied to exported directories."""
    auto = auto_lm_class(objective)
    teacher = auto.from_pretrained(teacher_dir).eval()
    probe = HeldoutProbe(data, teacher, head_name(teacher), max_blocks, batch_size, torch.device("cpu"))
    results = {}
    for name, path in {"teacher": teacher_dir, **model_dirs}.items():
        got = probe(teacher if path == teacher_dir else auto.from_pretrained(path).eval())
        results[name] = {"mlm_loss": got["mlm_loss"], "kl_to_teacher": got["kl"], "masked_accuracy": got["masked_accuracy"],
                         "scored_tokens": got["scored_tokens"]}
    return results
