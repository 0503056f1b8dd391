"""Rank-local importance against the full-gather reference (the driver of test_importance_local.py).

``record(overrides)`` runs the recipe in this process with a second, reference pruner beside
the run's: at every importance step the reference gets the full fp32 parameters and full
rank-averaged gradients (DeepSpeed's gathers, the path the run no longer takes) through
``Pruner.observe``, follows the run's mask updates and shrinks, and is compared with the run's
pruner. Returns the largest relative score difference, whether every mask update agreed, and
how many steps were committed, masked and shrunk.

Run as a script (``python tests/importance_runs.py SPECS OUT``, alone or under torchrun), it
records every run of ``SPECS`` (a JSON list of override lists) in one process; rank 0 writes the
records to ``OUT`` with ``torch.save``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from recipe_runs import run_inprocess, run_specs  # noqa: E402


def _full(prm, with_grad: bool):
    """The full-gather reference: full fp32 value and rank-averaged gradient (collective at ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_grad

    from homodistil.engine.zero import full_param

    return full_param(prm), safe_get_full_grad(prm).float().clone() if with_grad else None


def record(overrides: list[str]) -> dict:
    recipe = run_inprocess(overrides, train=False)
    reference = recipe._make_pruner(recipe.groups)
    out = {"rel": 0.0, "masks_equal": True, "commits": 0, "updates": 0, "shrinks": 0, "fragment_numel": 0}
    observe, commit, update_masks, shrink = (recipe._observe, recipe._commit_importance, recipe._update_masks,
                                             recipe._shrink)
    full: dict = {}

    def observed():
        need_grad = reference.importance.needs_grad
        full.clear()
        for name, prm in recipe.engine.module.named_parameters():
            if name in reference.params:
                full[name] = _full(prm, need_grad)
        observe()
        if not out["fragment_numel"]:  # before any shrink: rank 0's share of the scored entries
            out["fragment_numel"] = sum(f[1] for f in recipe.pruner.fragments.values())
            out["scored_numel"] = sum(t.numel() for t, _ in full.values())

    def committed(skipped):
        pending = bool(recipe.pruner.pending)
        commit(skipped)
        if not pending or skipped:
            return
        reference.observe(full, fold=recipe.schedule.folds(recipe.step))
        out["commits"] += 1
        for name, ref in reference.scores.items():
            got = recipe.pruner.scores[name]
            rel = float(((got.detach() - ref.detach()).abs() / ref.abs().clamp_min(1e-30)).max()) if ref.numel() else 0.0
            out["rel"] = max(out["rel"], rel)

    def updated():
        update_masks()
        reference.update_masks(recipe.step)
        out["updates"] += 1
        out["masks_equal"] &= all(torch.equal(recipe.pruner.masks[n], m) for n, m in reference.masks.items())

    def shrunk():
        shrink()
        reference.shrink(recipe.groups)
        out["shrinks"] += 1

    recipe._observe, recipe._commit_importance, recipe._update_masks, recipe._shrink = observed, committed, updated, shrunk
    try:
        recipe.train()
    finally:
        recipe.close()
    return out


if __name__ == "__main__":
    run_specs(record, *sys.argv[1:])
