"""Teacher–student prediction KL and MLM loss on held-out text, from exported model dirs.

The held-out blocks are the run's own (``data.heldout_fraction`` of the packed text, masked
identically for every model), so the figures compare like with like.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from homodistil.data.mlm import MLMBatches, build_blocks


@torch.no_grad()
def heldout_metrics(model_dirs: dict[str, str], teacher_dir: str, *, source, max_seq_length: int,
                    mlm_probability: float, seed: int, heldout_fraction: float, max_documents: int | None = None,
                    cache_dir=None, batch_size: int = 16, max_blocks: int = 128,
                    objective: str = "mlm") -> dict[str, dict[str, float]]:
    """Per model: ``mlm_loss`` and ``masked_accuracy`` at the scored tokens of the held-out
    blocks (masked tokens for MLM, next tokens for a causal LM), and ``kl_to_teacher`` =
    KL(p_teacher ‖ p_model) there (nats per token, τ = 1)."""
    auto = AutoModelForCausalLM if objective == "causal" else AutoModelForMaskedLM
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    blocks = build_blocks(source, tokenizer, max_seq_length, max_documents=max_documents, cache_dir=cache_dir,
                          objective=objective)
    data = MLMBatches(blocks, tokenizer, mlm_probability=mlm_probability, seed=seed, heldout_fraction=heldout_fraction,
                      objective=objective)
    teacher = auto.from_pretrained(teacher_dir).eval()
    batches = list(data.heldout_batches(batch_size, max_blocks))
    teacher_logp = [F.log_softmax(teacher(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits[
        b["labels"] != -100].float(), -1) for b in batches]
    results = {}
    for name, path in {"teacher": teacher_dir, **model_dirs}.items():
        model = teacher if path == teacher_dir else auto.from_pretrained(path).eval()
        loss = kl = correct = count = 0.0
        for batch, t_logp in zip(batches, teacher_logp):
            scored = batch["labels"] != -100
            logp = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                scored].float(), -1)  # (M, V)
            labels = batch["labels"][scored]
            loss += float(F.nll_loss(logp, labels, reduction="sum"))
            kl += float(F.kl_div(logp, t_logp, log_target=True, reduction="sum"))
            correct += float((logp.argmax(-1) == labels).sum())
            count += labels.numel()
        results[name] = {"mlm_loss": loss / count, "kl_to_teacher": kl / count, "masked_accuracy": correct / count}
    return results
