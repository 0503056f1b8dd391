"""``homodistil export RUN_OR_CHECKPOINT OUT_DIR``: a dense Hugging Face model from a checkpoint."""
from __future__ import annotations

from homodistil.engine.export import export_checkpoint
from homodistil.pruning.adapters import get_adapter


def export_main(checkpoint: str, out_dir: str) -> int:
    model = export_checkpoint(checkpoint, out_dir)
    n = sum(p.numel() for p in model.parameters())
    # the adapter knows each family's width fields: its kept widths at sparsity 0 are the model's
    widths = get_adapter(model.config.model_type).kept(model.config, {"ffn": 0.0, "attention": 0.0, "hidden": 0.0})
    print(f"exported {type(model).__name__} ({n / 1e6:.2f}M parameters; widths "
          f"{', '.join(f'{k} {v}' for k, v in widths.items())}) to {out_dir}")
    return 0
