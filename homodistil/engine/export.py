"""Export the student as a dense Hugging Face model directory (no projections, no custom code)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from homodistil.lm.forward import auto_lm_class
from homodistil.pruning.adapters import get_adapter
from homodistil.pruning.groups import shrink_tensors

from . import checkpoint
from .models import student_groups

log = logging.getLogger("homodistil.export")
KEPT_UNITS = "kept_units.json"  # beside the model: per pruning group, the teacher's indices of the kept units


class ExportError(ValueError):
    """The checkpoint cannot be exported (printed as one line)."""


def export_dense(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], meta: dict, out_dir: str | Path,
                 origin: dict[str, torch.Tensor] | None = None):
    """Shrink ``params`` (the student's full fp32 tensors, ``lm.*``/``proj.*``) to ``masks`` and save; with
    ``origin`` (per group, each current unit's index in the teacher), also which teacher units were kept.

    Returns the exported model (in eval mode) for callers that want to check it.
    """
    teacher_config = AutoConfig.for_model(**meta["teacher_config"])
    adapter = get_adapter(teacher_config.model_type)
    config = adapter.shrunk_config(teacher_config, meta["kept"])
    groups = student_groups(adapter, config, meta["n_proj"])
    keep = {name: m.nonzero().squeeze(1) for name, m in masks.items()}
    lm_params = shrink_tensors(params, groups, keep)
    kept = {g.kind: int(masks[g.name].view(g.blocks, -1)[0].sum()) for g in groups}
    final = adapter.shrunk_config(teacher_config, kept)
    state = {k.removeprefix("lm."): v for k, v in lm_params.items() if k.startswith("lm.")}
    state = adapter.export_state(state, final, teacher_config)
    final._attn_implementation = None
    model = auto_lm_class(adapter.objective).from_config(final)
    allowed_missing = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise ExportError(f"exported state does not match {type(model).__name__}: "
                          f"missing {sorted(set(result.missing_keys) - allowed_missing)[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if origin is not None:
        units = {name: origin[name][m].tolist() for name, m in masks.items()}
        (out_dir / KEPT_UNITS).write_text(json.dumps(units) + "\n")
    if meta.get("tokenizer"):
        AutoTokenizer.from_pretrained(meta["tokenizer"]).save_pretrained(out_dir)
    log.info("exported %s (%.2fM parameters) to %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, out_dir)
    return model.eval()


def _resolve(path: Path) -> tuple[Path, str]:
    """(checkpoints root, tag) from a run dir, a checkpoints dir or a tag dir."""
    for root in (path / "checkpoints", path):
        _, ignored = checkpoint.read_latest(root)
        if ignored:
            log.warning(ignored)
        tag = checkpoint.find_latest(root)
        if tag:
            return root, tag
    if (path / checkpoint.COMPLETE).exists():
        return path.parent, path.name
    raise ExportError(f"{path}: no complete checkpoint found (expected a run directory, its "
                      f"checkpoints/ directory, or a checkpoints/stepNNNNNNNN directory)")


def _full_state(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    if list((root / tag).glob("*zero_pp_rank_*")):  # ZeRO 1-3 or the bf16 optimizer: sharded fp32 state
        return _untie(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
    files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ExportError(f"{root / tag}: no DeepSpeed model states file")
    return _untie(checkpoint.safe_load(files[0], map_location="cpu")["module"])


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per shared tensor (the first, as ``named_parameters`` does): tied weights
    such as BERT's decoder/word embeddings appear under both names in a saved state dict."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen or tensor.numel() == 0:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


def _read_meta(root: Path, tag: str) -> dict:
    """The checkpoint's ``meta.json``, or an ExportError naming it when it is not what a run writes."""
    try:
        meta = checkpoint.read_meta(root, tag)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{root / tag / checkpoint.META}: unreadable ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'empty'})") from None
    missing = [k for k in ("teacher_config", "kept", "n_proj") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ExportError(f"{root / tag / checkpoint.META}: damaged (no {', '.join(missing)})")
    return meta


def export_checkpoint(path: str | Path, out_dir: str | Path):
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # checked before any loading
        raise ExportError(f"{out_dir}: exists and is not a directory")
    root, tag = _resolve(Path(path))
    checkpoint.check_loadable(root / tag)  # before zero_to_fp32, which unpickles without the weights-only guard
    meta = _read_meta(root, tag)
    pruner_state, _ = checkpoint.load_run_state(root, tag, 0)
    state = _full_state(root, tag)
    params = {k: v.float() for k, v in state.items() if k.startswith(("lm.", "proj."))}
    return export_dense(params, pruner_state["masks"], meta, out_dir, pruner_state.get("origin"))
