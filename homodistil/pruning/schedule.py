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
