"""The pruning schedule of HomoDistil (docs/design.md §1 steps 4-6; Zhu & Gupta 2017): when a run scores, folds,
masks and shrinks, and how wide the student is at every step.

One owner: the recipe (``Recipe.train``), the pruner (its mask widths), the planner (``cost.make_plan``: the widths
between shrinks and their number) and ``compare`` (the budget runs' schedules) all ask :class:`PruningSchedule`.
Torch-free: ``homodistil plan`` imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable


def cubic_sparsity(step: int, t_i: int, t_f: int, s_final: float) -> float:
    """Target sparsity at ``step``: 0 before ``t_i``, ``s_final`` from ``t_f`` on, and

        s(t) = s_final · (1 − (1 − (t − t_i) / (t_f − t_i))³)   for t_i ≤ t < t_f,

    so pruning is fast early (when the model is redundant) and slow near the target.
    """
    if t_f <= t_i:
        raise ValueError(f"t_f ({t_f}) must be greater than t_i ({t_i})")
    if step < t_i:
        return 0.0
    if step >= t_f:
        return s_final
    progress = (step - t_i) / (t_f - t_i)
    return s_final * (1.0 - (1.0 - progress) ** 3)


def kept_units(size: int, sparsity: float, quantum: int = 1) -> int:
    """Units kept out of ``size`` (a multiple of ``quantum``) at ``sparsity``: the removed units rounded to the
    nearest multiple of ``quantum`` (so the kept count is one too, within half a quantum of ``size·(1 − sparsity)``),
    and at least one quantum, so no matrix vanishes."""
    return max(quantum, size - quantum * round(size * sparsity / quantum))


def aligned_quantum(units: int, blocks: int, multiple: int, final: float) -> int:
    """The step, in units per block, of a width of ``blocks`` blocks (heads; 1 for an FFN) of ``units`` units that
    must stay a multiple of ``blocks`` × that step (the architecture's constraint) and of ``multiple``
    (``pruning.width_multiple``): lcm(blocks, multiple) / blocks.

    A width too small for ``multiple`` takes the largest of multiple, multiple/2, multiple/4, …, 1 (halving while
    even) whose step divides ``units`` and is at most the final target (``kept_units(units, final)`` per block),
    so the schedule still reaches its target within one step; multiple 1 gives step 1, the unaligned widths.
    E.g. FFN 3072 at 64 -> 64; a tiny FFN of 64 units pruned to 32 -> 32; 12 heads of 64 at hidden multiple 8 ->
    lcm(12, 8) / 12 = 2 units per head; 9 heads (SmolLM2) -> lcm(9, 8) / 9 = 8."""
    target = kept_units(units, final)
    while multiple > 1:
        step = math.lcm(blocks, multiple) // blocks
        if units % step == 0 and step <= target:
            return step
        multiple = multiple // 2 if multiple % 2 == 0 else 1
    return 1


def update_drops(t_i: int, t_f: int, s_final: float, interval: int) -> list[float]:
    """The sparsity each mask update adds, in order, when masks are updated at the multiples of ``interval``
    and at ``t_f`` (the recipe's cadence), starting from the dense model."""
    steps = sorted({*range(interval, t_f + 1, interval), t_f})
    levels = [0.0, *(cubic_sparsity(t, t_i, t_f, s_final) for t in steps)]
    return [b - a for a, b in zip(levels, levels[1:])]


def largest_mask_interval(t_i: int, t_f: int, s_final: float, max_drop: float) -> int:
    """The largest mask interval whose every update adds at most ``max_drop`` sparsity (a fraction of each
    width); 1 when even updates at every step add more. About ``max_drop · (t_f − t_i) / (3 · s_final)``: the
    schedule is steepest at ``t_i``, where one step adds about 3·s_final/(t_f − t_i)."""
    fits = [m for m in range(1, t_f + 1) if max(update_drops(t_i, t_f, s_final, m)) <= max_drop]
    return max(fits, default=1)


def budget_cadence(t_i: int, t_f: int, s_final: float, max_drop: float) -> tuple[int, int]:
    """(mask_interval, shrink_interval) of a budget run (``homodistil compare --budgets``): the largest mask
    interval whose every update adds at most ``max_drop`` of each width, and a shrink every ~5% of the pruning
    window, a multiple of the mask interval (shrinking is invisible, it only saves time)."""
    mask = largest_mask_interval(t_i, t_f, s_final, max_drop)
    return mask, mask * max(1, round((t_f - t_i) / 20 / mask))


Widths = dict[str, int]  # per kind ("ffn", "attention", "hidden"): units kept per block


def folds_at(step: int, window: int, read: bool) -> bool:
    """Whether PLATON folds its state into the group scores after ``step``: where the scores are ``read``, and
    where a window of ``window`` > 1 steps ends (its mean moves the EMAs then). At window 1 the scores are the
    latest step's S, so a fold anywhere else would be overwritten unread."""
    return read or (window > 1 and step % window == 0)


@dataclass(frozen=True)
class PruningSchedule:
    """When a run of ``max_steps`` steps scores, folds, masks and shrinks, and the kept widths at every step.

    Steps are numbered as in metrics.jsonl: step ``s`` is the ``s``-th optimizer step (the first is 1); a
    decision "at step s" is taken once that step's optimizer update is done (scoring: on its gradients).
    ``widths(sparsity)`` gives the units kept per block at per-kind sparsities, aligned to
    ``pruning.width_multiple`` (the adapter's kept widths: :func:`for_run`).
    """

    max_steps: int
    t_i: int
    t_f: int
    mask_interval: int
    shrink_interval: int
    score_after: int
    platon_window: int
    final: dict[str, float]  # per-kind final sparsity
    oneshot: bool  # the student is at the final widths from step 0 (pruning.schedule=oneshot, model.init=scratch)
    widths: Callable[[dict[str, float]], Widths]

    @classmethod
    def for_run(cls, cfg, adapter, teacher_config) -> "PruningSchedule":
        """The schedule of run config ``cfg`` (a ``config.Config``) for a teacher of ``teacher_config``, whose
        ``adapter`` combines ``pruning.width_multiple`` with the architecture's own width constraints."""
        p = cfg.pruning
        final, multiple = p.sparsity.model_dump(), p.width_multiple.model_dump()
        quanta = adapter.quanta(teacher_config, final, multiple)
        return cls(cfg.trainer.max_steps, p.t_i, p.t_f, p.mask_interval, p.shrink_interval, p.score_after,
                   p.platon_window, final, p.schedule == "oneshot" or cfg.model.init == "scratch",
                   lambda sparsity: adapter.kept(teacher_config, sparsity, quanta))

    @property
    def prunes(self) -> bool:
        """Whether the student is pruned while it trains (cubic schedule from the teacher, some sparsity > 0)."""
        return not self.oneshot and any(s > 0 for s in self.final.values())

    def sparsity(self, step: int) -> dict[str, float]:
        """Target sparsity per kind (logged): the cubic schedule, or the final sparsity from step 0."""
        if self.oneshot:
            return dict(self.final)
        return {k: cubic_sparsity(step, self.t_i, self.t_f, s) for k, s in self.final.items()}

    def kept(self, step: int) -> Widths:
        """Units kept per block at ``step``'s target sparsity, each a multiple of its kind's quantum."""
        return self.widths(self.sparsity(step))

    def scores(self, step: int) -> bool:
        """Importance is measured on ``step``'s gradients: from max(t_i − mask_interval, score_after + 1) (scores
        for the first mask update past t_i, none from the first score_after steps) through t_f."""
        return self.prunes and max(self.t_i - self.mask_interval, self.score_after + 1) <= step <= self.t_f

    def folds(self, step: int) -> bool:
        """PLATON's state is folded into the group scores at ``step``: where they are read (a mask update), where
        a window ends (platon_window > 1), and always at t_f (:func:`folds_at`)."""
        return folds_at(step, self.platon_window, self.masks(step) or step == self.t_f)

    def masks(self, step: int) -> bool:
        """The masks follow the schedule at ``step``: every mask_interval steps and at t_f, inside (t_i, t_f]
        (before t_i the target is the dense model, after t_f it no longer moves)."""
        return self.prunes and self.t_i < step <= self.t_f and (step % self.mask_interval == 0 or step == self.t_f)

    def shrinks(self, step: int) -> bool:
        """Masked units are removed at ``step``: every shrink_interval steps and at t_f, where a mask update
        since the last shrink changed a width."""
        return step in self.shrunk

    @cached_property
    def shrunk(self) -> dict[int, Widths]:
        """Every step with a shrink and the widths it shrinks to (those of the last mask update): the cadence
        points (multiples of shrink_interval, and t_f) up to t_f at which they differ from the previous point's."""
        if not self.prunes:
            return {}
        out, width = {}, self.kept(0)
        last = width
        masks = iter(m for m in range(self.t_i + 1, self.t_f + 1) if self.masks(m))
        pending = next(masks, None)
        for point in sorted({*range(self.shrink_interval, self.t_f + 1, self.shrink_interval), self.t_f}):
            while pending is not None and pending <= point:
                width, pending = self.kept(pending), next(masks, None)
            if width != last:
                out[point] = last = width
        return out

    def widths_after(self, step: int) -> Widths:
        """The student's real widths once step ``step`` is done (its last shrink's; a one-shot or scratch
        student's final widths): what a checkpoint saved at ``step`` holds."""
        if self.oneshot:
            return self.widths(self.final)
        done = [width for at, width in self.shrunk.items() if at <= step]
        return done[-1] if done else self.kept(0)

    def segments(self) -> list[tuple[int, int, Widths]]:
        """The student's widths over the run: ``(start, end, kept)`` for steps ``start + 1 … end``, split at each
        shrink (masked units are still computed until the shrink removes them). A one-shot or scratch student has
        the final widths throughout."""
        if self.oneshot:
            return [(0, self.max_steps, self.widths(self.final))]
        bounds = [(0, self.kept(0)), *self.shrunk.items(), (self.max_steps, None)]
        return [(a, b, width) for (a, width), (b, _) in zip(bounds, bounds[1:]) if b > a]
