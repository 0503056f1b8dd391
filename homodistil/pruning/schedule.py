"""The cubic sparsity schedule of HomoDistil (docs/design.md §1 step 5; Zhu & Gupta 2017)."""
from __future__ import annotations


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


def kept_units(size: int, sparsity: float) -> int:
    """Units kept out of ``size`` at ``sparsity`` (at least one, so no matrix vanishes)."""
    return max(1, size - int(round(size * sparsity)))


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
