"""Recipe runs that record what shrinking must not change (the driver of test_shrink_invisible.py).

``record(overrides)`` runs the recipe in this process and returns, for the comparisons:
- ``losses``: the logged loss of every step;
- ``live``: after every mask update, each group's live units as indices of the *teacher's* units
  (a run that has shrunk renumbers its units; these are comparable across runs);
- ``shrinks``: at every shrink, the largest |masked − shrunk| output (logits, hidden states,
  attention maps) on a fixed batch, and the widths it shrank to;
- ``params``: the final full fp32 parameters.

Run as a script (``python tests/shrink_runs.py SPECS OUT``, alone or under torchrun), it records
every run of ``SPECS`` (a JSON list of override lists) in one process, so that one torchrun
launch checks many runs; rank 0 writes the records to ``OUT`` with ``torch.save``.
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

from recipe_runs import losses, run_inprocess, run_specs  # noqa: E402


def _outputs(recipe, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = recipe.engine(batch["input_ids"], batch["attention_mask"], batch["labels"] != -100, True, True)
    return [out["logits"].float(), torch.stack(out["hidden"]).float(), torch.stack(out["attentions"]).float()]


def record(overrides: list[str]) -> dict:
    from homodistil.engine.zero import gather

    recipe = run_inprocess(overrides, train=False)
    batch = recipe._batch(0)
    alive = {g.name: torch.arange(g.size) for g in recipe.groups}  # this run's units, as teacher indices
    live, shrinks = [], []
    update_masks, shrink = recipe._update_masks, recipe._shrink

    def recorded_update_masks():
        update_masks()
        live.append((recipe.step, {n: alive[n][m.cpu()].tolist() for n, m in recipe.pruner.masks.items()}))

    def checked_shrink():
        before = _outputs(recipe, batch)
        for name, m in recipe.pruner.masks.items():
            alive[name] = alive[name][m.cpu()]
        shrink()
        diff = max(float((a - b).abs().max()) for a, b in zip(_outputs(recipe, batch), before))
        shrinks.append((recipe.step, dict(recipe.kept), diff))

    recipe._update_masks, recipe._shrink = recorded_update_masks, checked_shrink
    try:
        recipe.train()
        params, _, _ = gather(recipe.engine)
    finally:
        recipe.close()
    out_dir = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("trainer.output_dir="))
    return {"losses": losses(out_dir), "live": live, "shrinks": shrinks, "params": params}


if __name__ == "__main__":
    run_specs(record, *sys.argv[1:])
