"""The cost model of a distillation run: parameters, FLOPs, memory per GPU and run time.

Used by ``homodistil plan`` (:mod:`homodistil.apps.plan` prints it) and by training's
``perf/*`` scalars (the same FLOP model, so plan and measurement compare).

Pure arithmetic on the config and the teacher's architecture: no download, and no torch at import
(the adapters, which import it, are asked for every model fact: shapes, parameter formulas, the
objective). The teacher's shape comes from ``model.tiny`` (``teacher: tiny``), a local model
directory's ``config.json``, or the adapters' small table of well-known hub ids (:func:`known_teacher`).

Memory (bytes per GPU, at step 0: the student starts as a full copy of the teacher and only
shrinks, so step 0 is the peak):

- teacher weights: ``P_T × e`` replicated (``e`` = 2 under bf16, else 4), or ``/ world`` under
  ``model.teacher_zero3`` plus the gathered working set (two layers in flight).
- student model states, ZeRO paper accounting (Rajbhandari et al. 2020) for ``Ψ`` trainable
  parameters (the LM plus the hidden-state projections): mixed precision keeps 2Ψ weights,
  2Ψ gradients and 12Ψ optimizer state (fp32 master, Adam m and v); fp32 keeps 4Ψ, 4Ψ, 8Ψ,
  except that DeepSpeed's stage 1/2 optimizer clones an fp32 master partition even when the
  weights are fp32 (``stage_1_and_2.py``: ``single_partition_of_fp32_groups``), so 12Ψ there
  (stage 3 reuses the fp32 partition: ``stage3.py``, "we don't need another copy").
  Stage 1 divides the optimizer state by the world size, stage 2 also the gradients,
  stage 3 everything. Plus the ZeRO communication buckets: stages 1/2 a reduce and an
  all-gather bucket (min(Ψ, bucket size) × e each); stage 3 the reduce bucket twice (its
  coalesced reduce-scatter concatenates the bucket's gradients into a flat copy) and the
  gathered parameters it keeps live between uses (min(Ψ, ``stage3_max_live_parameters``,
  default 1e9) × e).
- importance state: what the metric keeps per scored weight (``pruning.importance``: PLATON keeps
  two fp32 EMAs of every scored weight and the step's new pair beside them until the optimizer's
  overflow verdict; with ``platon_window`` > 1: the EMAs, the window's running mean and the step's
  |w·g|; magnitude and sensitivity nothing), for
  the rank's own partition only (engine/fragments.py: 1/world of the weights at every stage); the
  scored weights are all but the MLM head's bias, counted as Ψ. Only while the student is pruned
  (cubic schedule from the teacher).
- activations kept for the backward pass, per layer for micro-batch ``b``, sequence ``s``,
  hidden ``h``, attention width ``h_a``, FFN width ``f``, ``a`` heads (Korthikanti et al. 2022,
  generalised to ``h_a != h`` and ``f != 4h``)::

      e·(4sbh + 4sbh_a + 2sbf + 2as²b)  +  (2sbh + as²b)   [dropout masks, 1 byte, if dropout > 0]

  (``34sbh + 5as²b`` for e=2, h_a=h, f=4h). The ``as²b`` terms are the eager attention maps;
  ``sdpa`` does not keep them. Plus the embeddings and the MLM head.
- what the losses hold: student and teacher logits (``sbV`` each, e bytes), fp32 softmaxes at
  the masked positions (``mlm_probability × sbV`` × 4 bytes, one per CE / two for the KL), the
  teacher's hidden states and attention maps (kept from its forward), the projected student
  hidden states.
- a fixed reserve for the CUDA context, NCCL and allocator fragmentation
  (:data:`RESERVE_GIB`).

On CPU the same parts, less the reserve, are what a run adds to its process's peak resident
set: tests/test_plan_memory.py holds them to within 20% of a world-size-2 run at ZeRO 2 and 3
(docs/profiling.md has the figures).

Time: FLOPs per token = 2 × (matmul parameters) + 4 × layers × s × h_a (attention scores and
values) for a forward pass; the student trains (3 × forward), the teacher only runs forward.
The student's widths are the run's own (``PruningSchedule.segments``: the cubic schedule's
aligned widths, stepping down at every shrink the run makes); between shrinks the student is
charged at its last shrunk size. Wall time = FLOPs / (GPUs × peak ×
MFU) + gradient communication (not overlapped, ring bandwidth of :data:`GPUS`) + a few
seconds per shrink. The MFU (model FLOPs utilisation) is an assumption: :data:`DEFAULT_MFU`.

Cross-check with the paper (HomoBERT-base: BERT-base teacher, 28k steps of 4096 × 128 tokens,
"around 13 hours on 8 Nvidia A100 GPUs"): this model counts 1.04e19 FLOPs (teacher forward
plus the shrinking student's forward and backward); at the default 25 % MFU of 8 × 312 TFLOPS
(A100, bf16) that is 4.7 h, 2.8× less than the paper reports. The paper's 13 h correspond to
~9 % MFU — plausible for 2022 code in fp16/fp32 that scores every weight each step;
``--mfu 0.09`` reproduces 13.0 h. tests/test_plan.py holds the default estimate to within a
factor of 4 of 13 h and the 9 % one to within 15 %. docs/slurm.md has the tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from homodistil.config import Config, ConfigError
from homodistil.pruning.arch import Arch
from homodistil.pruning.schedule import PruningSchedule, Widths

GIB = 1024**3
SHRINK_HOST_BYTES_PER_PARAM = 12  # fp32 weight + Adam m + v: what a shrink carries of each parameter (engine/zero.py)
SHRINK_CHUNK_BYTES = 64 * 2**20  # a shrink reads a 2-D parameter above this fp32 size in row chunks of at most this size


class PlanError(ConfigError):
    """The teacher's architecture is unknown (printed as one line, exit 2)."""


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the driver reports (nvidia-smi), not the marketing GB
    bf16_tflops: float  # dense tensor-core peak
    tf32_tflops: float  # fp32 training: assumes TF32 matmuls are enabled
    nvlink_gbs: float  # ring all-reduce bus bandwidth inside a node, GB/s
    internode_gbs: float  # per GPU across nodes (one 200 Gb/s HDR / 400 Gb/s NDR NIC per GPU), GB/s


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("A100-SXM 40GB", 40.0, 312.0, 156.0, 230.0, 23.0),
    "a100-80gb": GPU("A100-SXM 80GB", 80.0, 312.0, 156.0, 230.0, 23.0),
    "h100-80gb": GPU("H100-SXM 80GB", 79.6, 989.0, 494.0, 370.0, 45.0),
    "h200": GPU("H200-SXM 141GB", 140.4, 989.0, 494.0, 370.0, 45.0),
}
DEFAULT_MFU = 0.25  # of the bf16 (or TF32) peak, for the whole distillation step
RESERVE_GIB = 2.5  # CUDA context + NCCL buffers + allocator fragmentation
SHRINK_SECONDS = 5.0  # gather + rebuild the engine + restore state, per shrink
STARTUP_SECONDS = 120.0  # load teacher, start the stream, init DeepSpeed


# --------------------------------------------------------------------------------------------
# Architectures: the adapters read them from Hugging Face configs (one owner of model facts)
# --------------------------------------------------------------------------------------------
TINY_VOCAB = 30522  # the tiny teacher's default tokenizer (MiniLM's bert-base-uncased WordPiece)


def adapter_of(a: Arch):
    """The adapter of ``a``'s family (it owns the family's formulas)."""
    from homodistil.pruning.adapters import get_adapter  # noqa: PLC0415 (imports torch)

    return get_adapter(a.family)


def hf_config(c: dict, source: str = "config.json"):
    """A Hugging Face config object from a ``config.json`` dictionary, with the family's adapter."""
    from transformers import AutoConfig  # noqa: PLC0415

    from homodistil.pruning.adapters import AdapterError, get_adapter  # noqa: PLC0415 (imports torch)

    kind = c.get("model_type")
    try:
        adapter = get_adapter(kind)
        return AutoConfig.for_model(kind, **{k: v for k, v in c.items() if k != "model_type"}), adapter
    except (AdapterError, ValueError) as err:
        raise PlanError(f"{source}: {err}") from None


def arch_from_hf_config(c: dict, source: str = "config.json") -> Arch:
    """An :class:`Arch` from a Hugging Face ``config.json`` dictionary (read by the family's adapter)."""
    config, adapter = hf_config(c, source)
    return adapter.arch(config)


def teacher_hf_config(cfg: Config):
    """(config, adapter) of the teacher: ``model.tiny``, a local ``config.json``, or the known table."""
    from homodistil.pruning.adapters import KNOWN_CONFIGS, get_adapter, known_config  # noqa: PLC0415 (imports torch)

    teacher = cfg.model.teacher
    if teacher == "tiny":
        adapter = get_adapter(cfg.model.tiny.family)
        return adapter.tiny_config(TINY_VOCAB, 0, cfg.model.tiny), adapter
    path = Path(teacher).expanduser()
    if (path / "config.json").is_file():
        return hf_config(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    known = known_config(teacher)
    if known is not None:
        return hf_config(known, teacher)
    known = ", ".join(KNOWN_CONFIGS)
    raise PlanError(f"model.teacher: '{teacher}' is neither a local model directory with config.json "
                    f"nor a known hub id ({known})")


def teacher_arch(cfg: Config) -> Arch:
    """The teacher's architecture (see :func:`teacher_hf_config`)."""
    config, adapter = teacher_hf_config(cfg)
    return adapter.arch(config)


def target_problem(cfg: Config) -> str | None:
    """Why the final widths cannot be exported as a standard model (the adapter's ``check_targets``),
    or None."""
    from homodistil.pruning.adapters import AdapterError  # noqa: PLC0415 (imports torch)

    config, adapter = teacher_hf_config(cfg)
    try:
        adapter.check_targets(config, cfg.pruning.sparsity.model_dump())
    except AdapterError as err:
        return str(err)
    return None


def run_schedule(cfg: Config) -> tuple[PruningSchedule, Callable[[Widths], Arch]]:
    """The run's pruning schedule (its widths aligned as training aligns them) and the student's architecture at
    given kept widths: the adapter's shrunk config, exactly what training builds."""
    config, adapter = teacher_hf_config(cfg)
    return (PruningSchedule.for_run(cfg, adapter, config),
            lambda kept: adapter.arch(adapter.shrunk_config(config, kept)))


def student_arch(cfg: Config, sparsity: dict[str, float]) -> Arch:
    """The student at per-kind ``sparsity`` (ffn, attention, hidden): the run's kept widths (head-width ties,
    Llama's hidden rounding, ``pruning.width_multiple``) and the adapter's shrunk config."""
    schedule, arch = run_schedule(cfg)
    return arch(schedule.widths(sparsity))


# --------------------------------------------------------------------------------------------
# Parameter counts (exact for transformers' BertForMaskedLM / RobertaForMaskedLM /
# GPT2LMHeadModel / LlamaForCausalLM; tests/test_plan.py checks them against real models)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    total: int  # the LM with its head (tied weights counted once)
    embedding_lookup: int  # token/position/type embeddings: looked up, not multiplied
    tied_head: int  # the vocabulary projection when it reuses the word embeddings (else 0)
    largest_layer: int  # the most parameters gathered at once (a layer or the embeddings)

    @property
    def matmul(self) -> int:
        """Parameters in a matrix product for every token (forward FLOPs ≈ 2 × this): all but the
        embedding lookups, plus the vocabulary projection even when it is tied to them."""
        return self.total - self.embedding_lookup + self.tied_head


def known_teacher(name: str) -> Arch:
    """The architecture of a known hub teacher (``bert-base-uncased``, ``gpt2``, ...)."""
    from homodistil.pruning.adapters import known_config  # noqa: PLC0415 (imports torch)

    return arch_from_hf_config(known_config(name), name)


def count_params(a: Arch) -> Params:
    """The family's exact counts (its adapter's ``param_counts``)."""
    n = adapter_of(a).param_counts(a)
    vocab = a.vocab_size * a.hidden_size
    # the vocabulary projection is a matmul even when its weight is the (looked-up) embedding
    return Params(total=n.total, embedding_lookup=n.embedding_lookup, tied_head=vocab if a.tie_word_embeddings else 0,
                  largest_layer=max(n.layer, vocab))


def backbone_params(a: Arch) -> int | None:
    """The papers' count where it differs from the LM's (BERT family: without the MLM head, with the
    pooler, ``BertModel``: BERT-base "110M" = 109,482,240); None for the other families."""
    return adapter_of(a).backbone_params(a)


def forward_flops_per_token(a: Arch, seq: int, extra_matmul: int = 0) -> float:
    p = count_params(a)
    return 2.0 * (p.matmul + extra_matmul) + 4.0 * a.num_layers * seq * a.attn_width


def runs_teacher(cfg: Config) -> bool:
    """Whether a step runs the teacher's forward at all (some distillation term is on)."""
    loss = cfg.loss
    return bool(loss.alpha_pred or loss.alpha_hidden or loss.alpha_attention)


def step_flops_per_token(cfg: Config, teacher: Arch, student: Arch) -> float:
    """FLOPs of one training step per token: the student's forward and backward (3 × forward,
    with the hidden-state projections from its width to the teacher's) plus the teacher's
    forward. The one FLOP model of ``homodistil plan`` and of the measured ``perf/mfu``."""
    seq = cfg.data.max_seq_length
    proj = (teacher.num_layers + 1) * teacher.hidden_size * student.hidden_size if cfg.loss.alpha_hidden else 0
    teacher_fwd = forward_flops_per_token(teacher, seq) if runs_teacher(cfg) else 0.0
    return 3.0 * forward_flops_per_token(student, seq, extra_matmul=proj) + teacher_fwd


def gpu_for_device(name: str) -> str | None:
    """The :data:`GPUS` key of a ``torch.cuda.get_device_name()`` (SXM figures), or None."""
    name = name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-80gb"
    if "A100" in name:
        return "a100-80gb" if "80G" in name else "a100-40gb"
    return None


def peak_tflops(gpu: str, bf16: bool) -> float:
    """Dense tensor-core peak of a :data:`GPUS` entry: bf16, or TF32 for fp32 training."""
    return GPUS[gpu].bf16_tflops if bf16 else GPUS[gpu].tf32_tflops


# --------------------------------------------------------------------------------------------
# Shrink and importance: per rank, under the streamed shrink and rank-local importance
# --------------------------------------------------------------------------------------------
def teacher_shapes(cfg: Config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(every parameter's shape, the names importance scores: those a prunable group slices) of the
    teacher's LM, built on the meta device (no memory, no weights)."""
    import torch  # noqa: PLC0415

    config, adapter = teacher_hf_config(cfg)
    with torch.device("meta"):
        model = adapter.build(config, config)
    return ({n: tuple(p.shape) for n, p in model.named_parameters()},
            {s.param for g in adapter.groups(config) for s in g.slices})


def importance_traffic(shapes: dict[str, tuple[int, ...]]) -> tuple[float, float]:
    """(bytes, bytes) per rank per fold (``PruningSchedule.folds``: PLATON's scores are formed only where they
    are read; the other metrics fold every scored step): one all-reduce of the score vectors (a row and
    a column fp32 score per row and column of each scored (N, K) parameter; (N,) counts as (N, 1)),
    and the full gather it replaces (each scored parameter's full fp32 weight once and its full
    gradient twice — the finiteness check, then the scores — on every rank)."""
    vectors = sum(shape[0] + (shape[1] if len(shape) > 1 else 1) for shape in shapes.values())
    numel = sum(_numel(shape) for shape in shapes.values())
    return 4.0 * vectors, 3 * 4.0 * numel


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shrink_host_bytes(psi: int, shapes, world: int) -> tuple[float, float]:
    """(streamed, full gather) host bytes per rank at a shrink of ``psi`` trainable parameters of
    ``shapes``: this rank's share of the fp32 weights and Adam moments (12 bytes per parameter /
    world) plus what one parameter costs while it is read, the larger of: the largest small
    parameter's three full tensors, and, if a 2-D parameter is above ``SHRINK_CHUNK_BYTES``, three
    chunks (the chunk, its kept rows, its kept rows and columns); one parameter is read at a time.
    The full gather held all of it on every rank. ``psi`` is the size before the shrink (the first
    shrink keeps nearly everything)."""
    b, chunk = SHRINK_HOST_BYTES_PER_PARAM, SHRINK_CHUNK_BYTES
    numels = [(_numel(shape), len(shape)) for shape in shapes]
    chunked = [n for n, ndim in numels if ndim == 2 and 4 * n > chunk]
    small = max((n for n, ndim in numels if not (ndim == 2 and 4 * n > chunk)), default=0)
    return b * psi / world + max(b * small, 3 * chunk if chunked else 0), float(b * psi)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def zero_model_states(psi: int, stage: int, world: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and Adam state of ``psi`` trainable parameters."""
    w, g, o = (2.0 * psi, 2.0 * psi, 12.0 * psi) if bf16 else (4.0 * psi, 4.0 * psi, 8.0 * psi)
    if not bf16 and stage in (1, 2):  # DeepSpeed's fp32 master partition, cloned from fp32 weights
        o += 4.0 * psi
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return {"weights": w, "gradients": g, "optimizer": o}


def layer_activation_bytes(a: Arch, b: int, s: int, e: int, eager: bool, dropout: bool) -> float:
    """Bytes one transformer layer keeps for backward (formula in the module docstring)."""
    h, ha, f, heads = a.hidden_size, a.attn_width, a.intermediate_size, a.num_heads
    attn_maps = heads * s * s * b if eager else 0
    mlp = adapter_of(a).ffn_activations * s * b * f  # e.g. GELU's in and out; SwiGLU's gate, up, act, product
    total = e * (4 * s * b * h + 4 * s * b * ha + mlp + 2 * attn_maps)
    if dropout:
        total += 2 * s * b * h + attn_maps
    return float(total)


def activation_bytes(cfg: Config, t: Arch, b: int, s: int) -> dict[str, float]:
    """Activation memory of one micro-batch, by part, with the student still full size."""
    e = 2 if cfg.bf16 else 4
    eager = cfg.model.attn_implementation == "eager"
    dropout = (cfg.model.dropout if cfg.model.dropout is not None else t.dropout) > 0
    h, V, L = t.hidden_size, t.vocab_size, t.num_layers
    layers = t.num_layers * layer_activation_bytes(t, b, s, e, eager, dropout)
    embed_head = e * 4 * s * b * h + (s * b * h if dropout else 0)  # embeddings LN/dropout, head transform
    loss = cfg.loss
    scored = 1.0 if adapter_of(t).objective == "causal" else cfg.data.mlm_probability  # next token: every position
    masked = scored * s * b * V
    logits = 2 * e * s * b * V + 4 * masked * ((1 if loss.alpha_lm else 0) + (2 if loss.alpha_pred else 0))
    kept = 0.0
    if loss.alpha_hidden:  # teacher hidden states + projected student hidden states
        kept += 2 * e * (L + 1) * s * b * h
    if loss.alpha_attention:  # teacher attention maps (the student's are counted in its layers)
        kept += e * L * t.num_heads * s * s * b
    return {"student layers": layers + embed_head, "logits and softmaxes": logits, "teacher outputs for losses": kept}


@dataclass
class Plan:
    gpu: GPU
    nodes: int
    gpus_per_node: int
    teacher: Arch
    student: Arch  # at the final sparsity
    teacher_params: Params
    student_params: Params
    projections: int  # trainable projection parameters at step 0
    memory: dict[str, float]  # bytes per GPU, by part
    global_batch: int
    tokens: float
    flops: float
    mfu: float
    compute_s: float
    comm_s: float
    overhead_s: float
    max_micro_batch: int
    shrink_host: tuple[float, float]  # host bytes per rank at a shrink: (streamed, the old full gather)
    importance_traffic: tuple[float, float]  # bytes per rank per fold: (score all-reduce, full gather)
    shrink_steps: tuple[int, ...]  # the steps the run shrinks at (PruningSchedule.shrunk), each charged SHRINK_SECONDS
    target_problem: str | None  # why the final widths are no standard model (the adapter's check_targets), or None

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_memory <= self.gpu.memory_gib * GIB

    @property
    def hours(self) -> float:
        return (self.compute_s + self.comm_s + self.overhead_s) / 3600.0


IMPORTANCE_STATE = "importance state"  # the memory part's name, followed by the metric's title


def importance_state(cfg: Config) -> tuple[str, int]:
    """(the metric's title, bytes per scored weight that it keeps over all ranks: its
    ``Importance.bytes_per_weight``, e.g. PLATON's EMAs and what a step holds until the optimizer's verdict);
    bytes only while a cubic schedule prunes a student started from the teacher. Each rank keeps its
    partition's share."""
    from homodistil.pruning.importance import from_config  # noqa: PLC0415 (imports torch)

    p = cfg.pruning
    prunes = cfg.model.init == "teacher" and p.schedule == "cubic" and any(v > 0 for v in p.sparsity.model_dump().values())
    metric = from_config(p)
    return metric.title, metric.bytes_per_weight() if prunes else 0


def _memory(cfg: Config, t: Arch, world: int, micro: int) -> dict[str, float]:
    e = 2 if cfg.bf16 else 4
    tp = count_params(t)
    projections = (t.num_layers + 1) * t.hidden_size * t.hidden_size if cfg.loss.alpha_hidden else 0
    psi = tp.total + projections
    mem: dict[str, float] = {}
    if cfg.model.teacher_zero3:
        mem["teacher weights (ZeRO-3)"] = e * tp.total / world + 2 * e * tp.largest_layer
    else:
        mem["teacher weights (replicated)"] = float(e * tp.total)
    stage = cfg.zero_stage
    states = zero_model_states(psi, stage, world, cfg.bf16)
    mem["student weights"] = states["weights"]
    mem["student gradients"] = states["gradients"]
    mem["optimizer state"] = states["optimizer"]
    zo = cfg.deepspeed.get("zero_optimization", {})

    def size(key: str, default: float) -> float:
        value = zo.get(key, default)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    if stage in (1, 2):
        mem["ZeRO buckets"] = e * (min(psi, size("reduce_bucket_size", 5e8)) + min(psi, size("allgather_bucket_size", 5e8)))
    elif stage == 3:  # the reduce bucket and its flat copy in the coalesced reduce-scatter
        mem["ZeRO buckets"] = 2 * e * min(psi, size("reduce_bucket_size", 5e8))
        mem["ZeRO-3 live parameters"] = e * min(psi, size("stage3_max_live_parameters", 1e9))
    title, per_weight = importance_state(cfg)
    if per_weight:
        mem[f"{IMPORTANCE_STATE} ({title})"] = per_weight * psi / world
    mem.update(activation_bytes(cfg, t, micro, cfg.data.max_seq_length))
    mem["CUDA context, NCCL, fragmentation"] = RESERVE_GIB * GIB
    return mem


def _comm_seconds(cfg: Config, psi: float, teacher_total: int, gpu: GPU, nodes: int, world: int) -> float:
    """Per optimizer step: gradient (and parameter) collectives, not overlapped with compute."""
    if world == 1:
        return 0.0
    e = 2 if cfg.bf16 else 4
    ring = (world - 1) / world
    stage, accum = cfg.zero_stage, cfg.grad_accum
    if stage <= 1:
        volume = 2 * e * psi * ring  # all-reduce (stage 1: reduce-scatter + all-gather)
    elif stage == 2:
        volume = e * psi * ring * (accum + 1)  # reduce-scatter every micro-step, all-gather once
    else:
        volume = 3 * e * psi * ring * accum  # all-gather fwd + bwd, reduce-scatter, every micro-step
    if cfg.model.teacher_zero3:
        volume += e * teacher_total * ring * accum
    bandwidth = (gpu.nvlink_gbs if nodes == 1 else gpu.internode_gbs) * 1e9
    return volume / bandwidth


def make_plan(cfg: Config, gpu: str, nodes: int, gpus_per_node: int = 8, mfu: float | None = None) -> Plan:
    if gpu not in GPUS:
        raise PlanError(f"unknown GPU '{gpu}': choose one of {', '.join(GPUS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be at least 1")
    mfu = DEFAULT_MFU if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    g = GPUS[gpu]
    world = nodes * gpus_per_node
    t = teacher_arch(cfg)
    schedule, arch = run_schedule(cfg)
    final = arch(schedule.widths(schedule.final))
    tp = count_params(t)
    projections = (t.num_layers + 1) * t.hidden_size * t.hidden_size if cfg.loss.alpha_hidden else 0
    micro, seq = cfg.micro_batch_size, cfg.data.max_seq_length
    memory = _memory(cfg, t, world, micro)

    global_batch = cfg.global_batch(world)
    steps = cfg.trainer.max_steps
    tokens_per_step = float(global_batch * seq)
    # student FLOPs, segment by segment between the run's shrinks (its widths at the last shrink)
    flops = sum((end - start) * tokens_per_step * step_flops_per_token(cfg, t, arch(kept))
                for start, end, kept in schedule.segments())
    peak = peak_tflops(gpu, cfg.bf16) * 1e12
    compute_s = flops / (world * peak * mfu)
    psi_start = tp.total + projections
    psi_end = count_params(final).total + ((t.num_layers + 1) * t.hidden_size * final.hidden_size if cfg.loss.alpha_hidden else 0)
    comm_s = steps * _comm_seconds(cfg, (psi_start + psi_end) / 2, tp.total, g, nodes, world)
    overhead_s = STARTUP_SECONDS + SHRINK_SECONDS * len(schedule.shrunk)

    shapes, scored = teacher_shapes(cfg)
    shrink_host = shrink_host_bytes(psi_start, shapes.values(), world)
    traffic = importance_traffic({n: shape for n, shape in shapes.items() if n in scored})
    largest = 0
    b = 1
    while b <= 65536:
        if sum(_memory(cfg, t, world, b).values()) > g.memory_gib * GIB:
            break
        largest, b = b, b * 2
    return Plan(g, nodes, gpus_per_node, t, final, tp, count_params(final), projections, memory, global_batch,
                tokens_per_step * steps, flops, mfu, compute_s, comm_s, overhead_s, largest, shrink_host, traffic,
                tuple(schedule.shrunk), target_problem(cfg))
