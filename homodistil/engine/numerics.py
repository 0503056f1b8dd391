"""Non-finite losses and gradients: the step is skipped, logged, and too many in a row stop the run.

What DeepSpeed offers (0.19.8): at ZeRO 1-3 its optimizer wrapper computes the global gradient
norm and, when it is NaN/Inf, skips the update, clears the gradients and reports it through
``engine.was_step_applied()`` — at fp32 and bf16 alike. At ZeRO-0 in fp32 the engine calls the
torch optimizer directly and has no such check, so :class:`AdamW` adds it there, through the
same ``overflow`` attribute the engine reads. Every rank sees the same verdict: the gradients
are all-reduced (stage 0) or the norm is (stages 1-3) before it is taken.

A skipped step consumes its batch and its place in the LR and sparsity schedules (so a bad
batch is not retried forever and the schedules stay functions of the step), and changes no
weight, Adam moment or step count, and no importance state.
"""
from __future__ import annotations

import torch


class TrainingStopped(RuntimeError):
    """The run stopped on purpose after saving a checkpoint: printed as one line."""


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that skips a step whose gradients are not all finite.

    ``overflow`` tells DeepSpeed's engine (ZeRO-0) that the step was skipped, as its ZeRO
    optimizers do; the engine then counts it in ``skipped_steps`` and ``was_step_applied()``.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = not all_finite(grads)
        if self.overflow:
            return None
        return super().step(closure)


def all_finite(tensors) -> bool:
    """Whether every tensor (None: skipped) is finite. ``tensors`` may be a generator: each is
    checked and dropped before the next is made, and every one is made (no short-circuit), so
    generators of ZeRO-3 gathers stay in step across ranks. One host read for all of them (on a
    GPU each read waits for the device)."""
    flags = [t.isfinite().all() for t in tensors if t is not None]  # () bool each, on the device
    return bool(torch.stack(flags).all()) if flags else True

