"""Evaluation of a causal-LM student beside its teacher: held-out perplexity and KL(teacher ‖ model)
on the run's held-out text (the training-time probe, :func:`homodistil.eval.heldout.heldout_metrics`),
parameters, CPU latency at a fixed batch, and greedy continuations of fixed prompts."""
from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .heldout import heldout_metrics
from .probe import count_parameters, measure_latency

PROMPTS = (  # fixed, so that every report continues the same text
    "The capital of France is",
    "In the beginning God created",
    "It is a truth universally acknowledged that",
    "To be, or not to be:",
    "def fibonacci(n):",
)
LATENCY_BATCH, LATENCY_SEQ = 8, 64  # the fixed batch the CPU latency is measured at


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The argmax continuation of ``prompt`` (the prompt itself excluded), stopping at EOS; what
    ``model.generate(do_sample=False)`` returns, without its configurable sampling machinery."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def decoder_metrics(model_dirs: dict[str, str], teacher_dir: str, data, *, max_blocks: int,
                    max_new_tokens: int = 24, batch_size: int = 8) -> dict[str, dict]:
    """Per model (the teacher first): ``perplexity`` = exp(mean next-token NLL) and ``kl_to_teacher``
    over ``scored_tokens`` held-out next tokens, ``params``, ``latency`` (CPU, a forward of
    ``LATENCY_BATCH`` x ``LATENCY_SEQ`` tokens) and ``continuations`` of :data:`PROMPTS`."""
    held = heldout_metrics(model_dirs, teacher_dir, data, batch_size=batch_size, max_blocks=max_blocks,
                           objective="causal")
    results = {}
    for name, path in {"teacher": teacher_dir, **model_dirs}.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        h = held[name]
        results[name] = {"path": path, "perplexity": math.exp(h["mlm_loss"]), "nll": h["mlm_loss"],
                         "kl_to_teacher": h["kl_to_teacher"], "next_token_accuracy": h["masked_accuracy"],
                         "scored_tokens": h["scored_tokens"], "params": count_parameters(model),
                         "latency": measure_latency(model, LATENCY_BATCH, LATENCY_SEQ, repeats=5),
                         "continuations": [greedy_continuation(model, tokenizer, p, max_new_tokens) for p in PROMPTS]}
    return results


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


def render_markdown(results: dict[str, dict]) -> str:
    """The figures as a table, then the prompts with every model's continuation side by side."""
    names = list(results)
    lines = ["| model | held-out perplexity | KL(teacher ‖ model) | next-token accuracy | scored tokens | "
             "parameters (non-embedding) | CPU latency |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lat = r["latency"]
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} | "
                     f"{100 * r['next_token_accuracy']:.1f}% | {r['scored_tokens']} | {r['params']['total'] / 1e6:.1f}M "
                     f"({r['params']['non_embedding'] / 1e6:.1f}M) | {lat['median_ms']:.0f} ms "
                     f"(batch {lat['batch_size']} x {lat['seq_len']}, {lat['threads']} threads) |")
    lines += ["", "Greedy continuations:", "", "| prompt | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for i, prompt in enumerate(PROMPTS):
        lines.append(f"| {_cell(prompt)} | " + " | ".join(_cell(results[n]["continuations"][i]) for n in names) + " |")
    return "\n".join(lines) + "\n"
