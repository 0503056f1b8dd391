"""Memory per GPU and run time of a distillation run on a cluster (``homodistil plan``).

Pure arithmetic on the config and the teacher's architecture: no torch, no download. The
teacher's shape comes from ``model.tiny`` (``teacher: tiny``), a local model directory's
``config.json``, or a small table of well-known hub ids (:data:`KNOWN_TEACHERS`).

Memory (bytes per GPU, at step 0: the student starts as a full copy of the teacher and only
shrinks, so step 0 is the peak):

- teacher weights: ``P_T × e`` replicated (``e`` = 2 under bf16, else 4), or ``/ world`` under
  ``model.teacher_zero3`` plus the gathered working set (two layers in flight).
- student model states, ZeRO paper accounting (Rajbhandari et al. 2020) for ``Ψ`` trainable
  parameters (the LM plus the hidden-state projections): mixed precision keeps 2Ψ weights,
  2Ψ gradients and 12Ψ optimizer state (fp32 master, Adam m and v); fp32 keeps 4Ψ, 4Ψ, 8Ψ.
  Stage 1 divides the optimizer state by the world size, stage 2 also the gradients,
  stage 3 everything. Plus the ZeRO communication buckets (min(Ψ, bucket size) × e each).
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

Time: FLOPs per token = 2 × (matmul parameters) + 4 × layers × s × h_a (attention scores and
values) for a forward pass; the student trains (3 × forward), the teacher only runs forward.
The student's widths follow the cubic schedule, stepping down at every shrink; between
shrinks the student is charged at its last shrunk size. Wall time = FLOPs / (GPUs × peak ×
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

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from homodistil.config import Config, ConfigError, load_config

GIB = 1024**3
SHRINK_HOST_BYTES_PER_PARAM = 12  # fp32 weight + Adam m + v, gathered by engine/zero.py at a shrink


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
# Architectures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """The few numbers of a transformer LM that memory and FLOPs depend on."""

    family: str  # "bert" (BERT / RoBERTa MLM), "gpt2", "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    head_dim: int | None = None  # llama: explicit; others: hidden // heads
    num_kv_heads: int | None = None
    tie_word_embeddings: bool = True
    dropout: float = 0.1

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_width

    @property
    def kv_width(self) -> int:
        return (self.num_kv_heads or self.num_heads) * self.head_width


def _bert(vocab=30522, h=768, layers=12, heads=12, f=3072, pos=512, types=2) -> Arch:
    return Arch("bert", vocab, h, layers, heads, f, pos, types)


KNOWN_TEACHERS: dict[str, Arch] = {
    "bert-base-uncased": _bert(),
    "bert-base-cased": _bert(vocab=28996),
    "bert-large-uncased": _bert(h=1024, layers=24, heads=16, f=4096),
    "roberta-base": _bert(vocab=50265, pos=514, types=1),
    "roberta-large": _bert(vocab=50265, h=1024, layers=24, heads=16, f=4096, pos=514, types=1),
    "gpt2": Arch("gpt2", 50257, 768, 12, 12, 3072, 1024, 0),
    "meta-llama/Meta-Llama-3-8B": Arch("llama", 128256, 4096, 32, 32, 14336, 8192, 0, head_dim=128,
                                       num_kv_heads=8, tie_word_embeddings=False, dropout=0.0),
}
_ALIASES = {
    "google-bert/bert-base-uncased": "bert-base-uncased", "google-bert/bert-base-cased": "bert-base-cased",
    "google-bert/bert-large-uncased": "bert-large-uncased", "FacebookAI/roberta-base": "roberta-base",
    "FacebookAI/roberta-large": "roberta-large", "openai-community/gpt2": "gpt2",
    "Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B", "Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-3.1-8B": "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Meta-Llama-3-8B",
}
CAUSAL_FAMILIES = ("gpt2", "llama")  # next-token objective: the losses read every position
TINY_VOCAB = 30522  # the tiny teacher uses a bert-base-uncased WordPiece vocabulary


def arch_from_hf_config(c: dict, source: str = "config.json") -> Arch:
    """An :class:`Arch` from a Hugging Face ``config.json`` dictionary."""
    kind = c.get("model_type")
    try:
        if kind in ("bert", "roberta", "xlm-roberta", "electra"):
            drop = max(c.get("hidden_dropout_prob", 0.1), c.get("attention_probs_dropout_prob", 0.1))
            return Arch("bert", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                        c["intermediate_size"], c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2),
                        tie_word_embeddings=c.get("tie_word_embeddings", True), dropout=drop)
        if kind == "gpt2":
            h = c["n_embd"]
            return Arch("gpt2", c["vocab_size"], h, c["n_layer"], c["n_head"], c.get("n_inner") or 4 * h,
                        c.get("n_positions", 1024), 0, dropout=c.get("resid_pdrop", 0.1))
        if kind in ("llama", "mistral", "qwen2"):
            h, heads = c["hidden_size"], c["num_attention_heads"]
            return Arch("llama", c["vocab_size"], h, c["num_hidden_layers"], heads, c["intermediate_size"],
                        c.get("max_position_embeddings", 4096), 0, head_dim=c.get("head_dim") or h // heads,
                        num_kv_heads=c.get("num_key_value_heads", heads),
                        tie_word_embeddings=c.get("tie_word_embeddings", False), dropout=c.get("attention_dropout", 0.0))
    except KeyError as err:
        raise PlanError(f"{source}: model_type {kind!r} without {err.args[0]!r}") from None
    raise PlanError(f"{source}: model_type {kind!r} is not modelled (bert, roberta, gpt2, llama are)")


def teacher_arch(cfg: Config) -> Arch:
    """The teacher's architecture: ``model.tiny``, a local ``config.json``, or the known table."""
    teacher = cfg.model.teacher
    if teacher == "tiny":
        t = cfg.model.tiny
        if t.family != "bert":  # the config the recipe builds (GQA, untied head, causal, ...)
            from homodistil.pruning.adapters import get_adapter

            config = get_adapter(t.family).tiny_config(TINY_VOCAB, 0, t)
            return arch_from_hf_config(config.to_dict(), f"model.tiny (family {t.family})")
        return Arch("bert", TINY_VOCAB, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                    t.intermediate_size, t.max_position_embeddings, 2)
    path = Path(teacher).expanduser()
    if (path / "config.json").is_file():
        return arch_from_hf_config(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    name = _ALIASES.get(teacher, teacher)
    if name in KNOWN_TEACHERS:
        return KNOWN_TEACHERS[name]
    known = ", ".join(KNOWN_TEACHERS)
    raise PlanError(f"model.teacher: '{teacher}' is neither a local model directory with config.json "
                    f"nor a known hub id ({known})")


def student_arch(teacher: Arch, ffn: float, attention: float, hidden: float) -> Arch:
    """Widths kept at the given sparsities, rounded as ``kept = size - round(size × s)``.

    BERT, RoBERTa and GPT-2 derive the head width from ``hidden / heads`` and heads are kept, so
    their hidden width is ``heads × kept head width`` (``hidden`` sparsity is not used: the
    config requires it to equal ``attention``). Llama has an explicit head width.
    """
    def kept(size: int, s: float) -> int:
        return max(1, size - int(round(size * s)))

    head = kept(teacher.head_width, attention)
    if teacher.family == "llama":
        return replace(teacher, hidden_size=kept(teacher.hidden_size, hidden), head_dim=head,
                       intermediate_size=kept(teacher.intermediate_size, ffn))
    return replace(teacher, hidden_size=teacher.num_heads * head, intermediate_size=kept(teacher.intermediate_size, ffn))


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


def count_params(a: Arch) -> Params:
    h, f, V, L = a.hidden_size, a.intermediate_size, a.vocab_size, a.num_layers
    ha, kv = a.attn_width, a.kv_width
    if a.family == "bert":
        emb = V * h + a.max_position * h + a.type_vocab_size * h
        layer = (2 * (h * ha + ha) + (h * ha + ha) + (ha * h + h) + 2 * h  # Q, K, V, O, LayerNorm
                 + (h * f + f) + (f * h + h) + 2 * h)  # FFN, LayerNorm
        head = (h * h + h) + 2 * h + V + (0 if a.tie_word_embeddings else V * h)  # transform, LN, decoder bias
        total = emb + 2 * h + L * layer + head  # + embedding LayerNorm
    elif a.family == "gpt2":
        emb = V * h + a.max_position * h
        layer = 2 * h + (h * 3 * ha + 3 * ha) + (ha * h + h) + 2 * h + (h * f + f) + (f * h + h)
        head = 0 if a.tie_word_embeddings else V * h
        total = emb + L * layer + 2 * h + head
    elif a.family == "llama":
        emb = V * h
        layer = h * ha + 2 * h * kv + ha * h + 3 * h * f + 2 * h
        head = 0 if a.tie_word_embeddings else V * h
        total = emb + L * layer + h + head
    else:
        raise PlanError(f"unknown architecture family {a.family!r}")
    # the vocabulary projection is a matmul even when its weight is the (looked-up) embedding
    tied_head = V * h if a.tie_word_embeddings else 0
    return Params(total=total, embedding_lookup=emb, tied_head=tied_head, largest_layer=max(layer, V * h))


def backbone_params(a: Arch) -> int:
    """BERT-family count without the MLM head, with the pooler (``BertModel``): the usual
    convention of papers (BERT-base "110M" = 109,482,240)."""
    p = count_params(a)
    h, V = a.hidden_size, a.vocab_size
    head = (h * h + h) + 2 * h + V + (0 if a.tie_word_embeddings else V * h)
    return p.total - head + (h * h + h) if a.family == "bert" else p.total


def forward_flops_per_token(a: Arch, seq: int, extra_matmul: int = 0) -> float:
    p = count_params(a)
    return 2.0 * (p.matmul + extra_matmul) + 4.0 * a.num_layers * seq * a.attn_width


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def zero_model_states(psi: int, stage: int, world: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and Adam state of ``psi`` trainable parameters."""
    w, g, o = (2.0 * psi, 2.0 * psi, 12.0 * psi) if bf16 else (4.0 * psi, 4.0 * psi, 8.0 * psi)
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
    mlp = 2 * s * b * f if a.family != "llama" else 4 * s * b * f  # GELU in/out; SwiGLU gate, up, act, product
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
    scored = 1.0 if t.family in CAUSAL_FAMILIES else cfg.data.mlm_probability  # next token: every position
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
    elif stage == 3:
        mem["ZeRO buckets"] = e * (min(psi, size("reduce_bucket_size", 5e8))
                                   + min(psi, size("stage3_prefetch_bucket_size", 5e7)))
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
    sp = cfg.pruning.sparsity
    final = student_arch(t, sp.ffn, sp.attention, sp.hidden)
    tp = count_params(t)
    projections = (t.num_layers + 1) * t.hidden_size * t.hidden_size if cfg.loss.alpha_hidden else 0
    micro, seq = cfg.micro_batch_size, cfg.data.max_seq_length
    memory = _memory(cfg, t, world, micro)

    global_batch = micro * cfg.grad_accum * world
    steps = cfg.trainer.max_steps
    tokens_per_step = float(global_batch * seq)
    teacher_fwd = forward_flops_per_token(t, seq)
    # student FLOPs, segment by segment between shrinks (its widths at the last shrink)
    p = cfg.pruning
    flops = 0.0
    shrinks = 0
    start = 0
    while start < steps:
        end = min(steps, (start // p.shrink_interval + 1) * p.shrink_interval)
        if start >= p.t_f:
            frac = 1.0
        else:
            frac = _cubic(start, p.t_i, p.t_f)
        s_arch = student_arch(t, sp.ffn * frac, sp.attention * frac, sp.hidden * frac)
        proj = (t.num_layers + 1) * t.hidden_size * s_arch.hidden_size if cfg.loss.alpha_hidden else 0
        student_fwd = forward_flops_per_token(s_arch, seq, extra_matmul=proj)
        flops += (end - start) * tokens_per_step * (3.0 * student_fwd + teacher_fwd)
        if start > 0 and start <= p.t_f + p.shrink_interval:
            shrinks += 1
        start = end
    peak = (g.bf16_tflops if cfg.bf16 else g.tf32_tflops) * 1e12
    compute_s = flops / (world * peak * mfu)
    psi_start = tp.total + projections
    psi_end = count_params(final).total + ((t.num_layers + 1) * t.hidden_size * final.hidden_size if cfg.loss.alpha_hidden else 0)
    comm_s = steps * _comm_seconds(cfg, (psi_start + psi_end) / 2, tp.total, g, nodes, world)
    overhead_s = STARTUP_SECONDS + SHRINK_SECONDS * shrinks

    largest = 0
    b = 1
    while b <= 65536:
        if sum(_memory(cfg, t, world, b).values()) > g.memory_gib * GIB:
            break
        largest, b = b, b * 2
    return Plan(g, nodes, gpus_per_node, t, final, tp, count_params(final), projections, memory, global_batch,
                tokens_per_step * steps, flops, mfu, compute_s, comm_s, overhead_s, largest)


def _cubic(step: int, t_i: int, t_f: int) -> float:
    """Fraction of the final sparsity reached at ``step`` (pruning.schedule.cubic_sparsity / s_final)."""
    if step < t_i:
        return 0.0
    if step >= t_f:
        return 1.0
    return 1.0 - (1.0 - (step - t_i) / (t_f - t_i)) ** 3


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def describe(plan: Plan, cfg: Config) -> str:
    t, s, g = plan.teacher, plan.student, plan.gpu
    prec = "bf16" if cfg.bf16 else "fp32 (TF32 peak assumed)"
    lines = [
        f"{plan.nodes} node(s) x {plan.gpus_per_node} {g.name} = {plan.world} GPUs; {prec}, ZeRO stage "
        f"{cfg.zero_stage}, {cfg.model.attn_implementation} attention",
        f"teacher   {cfg.model.teacher} ({t.family}): {t.num_layers} layers, hidden {t.hidden_size}, "
        f"{t.num_heads} heads x {t.head_width}, FFN {t.intermediate_size}, vocab {t.vocab_size}: "
        f"{_m(plan.teacher_params.total)} parameters",
        f"student   hidden {s.hidden_size}, heads x {s.head_width}, FFN {s.intermediate_size} at the end: "
        f"{_m(plan.student_params.total)} parameters"
        + (f" ({_m(backbone_params(s))} without MLM head, with pooler: the papers' convention)" if s.family == "bert" else ""),
        f"batch     {cfg.micro_batch_size} micro x {cfg.grad_accum} accumulation x {plan.world} GPUs = "
        f"{plan.global_batch} sequences x {cfg.data.max_seq_length} tokens; {cfg.trainer.max_steps} steps = "
        f"{plan.tokens / 1e9:.2f}B tokens",
        "",
        "memory per GPU (peak, at step 0: the student is still a full copy of the teacher)",
    ]
    width = max(len(k) for k in plan.memory)
    for key, value in plan.memory.items():
        lines.append(f"  {key:<{width}}  {_gib(value)}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<{width}}  {_gib(plan.total_memory)}  of {g.memory_gib:.0f} GiB: {verdict}")
    lines.append(f"  largest micro-batch that fits: {plan.max_micro_batch or 'none'}"
                 + ("" if plan.max_micro_batch < 65536 else " or more"))
    lines += [
        "",
        f"time      {plan.flops:.2e} FLOPs (student fwd+bwd over its shrinking widths + teacher fwd)",
        f"          at {plan.mfu:.0%} MFU of {plan.world} x "
        f"{g.bf16_tflops if cfg.bf16 else g.tf32_tflops:.0f} TFLOPS: compute {_hms(plan.compute_s)}, "
        f"gradient communication {_hms(plan.comm_s)}, start-up and shrinks {_hms(plan.overhead_s)}",
        f"          estimated run time {plan.hours:.1f} h "
        f"({plan.hours * 3600 / cfg.trainer.max_steps:.2f} s/step; {plan.hours * plan.world:.0f} GPU-hours)",
    ]
    host = SHRINK_HOST_BYTES_PER_PARAM * (plan.teacher_params.total + plan.projections) * plan.gpus_per_node
    lines.append(f"host      each in-place shrink holds the student's full fp32 state (weights, Adam m and v) "
                 f"on every rank: {_gib(host).strip()} of host memory per node")
    if not plan.fits:
        lines.append("WARNING: " + _advice(plan, cfg))
    elif plan.total_memory > 0.9 * g.memory_gib * GIB:
        lines.append("note: above 90% of the GPU memory; unmodelled temporaries may not fit")
    if cfg.pruning.sparsity.attention != cfg.pruning.sparsity.hidden and t.family != "llama":
        lines.append("note: BERT-like models need pruning.sparsity.attention == pruning.sparsity.hidden")
    return "\n".join(lines)


def _advice(plan: Plan, cfg: Config) -> str:
    mem = plan.memory
    need, have = plan.total_memory / GIB, plan.gpu.memory_gib
    tips = []
    states = mem["student weights"] + mem["student gradients"] + mem["optimizer state"]
    acts = mem["student layers"] + mem["logits and softmaxes"] + mem["teacher outputs for losses"]
    if not cfg.bf16:
        tips.append("deepspeed.bf16.enabled=true")
    if acts > states and plan.max_micro_batch:
        tips.append(f"deepspeed.train_micro_batch_size_per_gpu={plan.max_micro_batch} with more "
                    f"deepspeed.gradient_accumulation_steps")
    if cfg.zero_stage < 3 and states > 0.2 * plan.total_memory:
        tips.append(f"deepspeed.zero_optimization.stage={max(2, cfg.zero_stage + 1)}")
    if not cfg.model.teacher_zero3 and mem.get("teacher weights (replicated)", 0) > 0.2 * plan.total_memory:
        tips.append("model.teacher_zero3=true")
    if not tips:
        tips.append("more GPUs (--nodes) or a larger GPU")
    return f"does not fit: needs {need:.1f} GiB per GPU, a {plan.gpu.name} has {have:.0f} GiB; try " + ", ".join(tips)


def format_plan(cfg: Config, gpu: str, nodes: int, gpus_per_node: int = 8, mfu: float | None = None) -> str:
    """A readable table: memory per GPU by part, whether it fits, and the estimated run time."""
    return describe(make_plan(cfg, gpu, nodes, gpus_per_node, mfu), cfg)


def plan_main(argv: list[str]) -> int:
    """``homodistil plan CONFIG [key=value ...] --gpu G --nodes N [--gpus-per-node 8] [--mfu F]``.

    Exit status: 0 it fits, 1 it does not fit (the table says why), 2 a config error.
    """
    parser = argparse.ArgumentParser(
        prog="homodistil plan",
        description="Memory per GPU and estimated run time of a config on a cluster (no GPU needed).")
    parser.add_argument("config", help="YAML config; 'defaults' for the built-in defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distill")
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="GPU type (default a100-80gb)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--mfu", type=float, default=None,
                        help=f"model FLOPs utilisation assumed for the time estimate (default {DEFAULT_MFU})")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(None if args.config == "defaults" else args.config, args.overrides)
        plan = make_plan(cfg, args.gpu, args.nodes, args.gpus_per_node, args.mfu)
    except ConfigError as err:
        print(f"homodistil plan: error: {err}", file=sys.stderr)
        return 2
    print(f"homodistil plan: {args.config}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(describe(plan, cfg))
    return 0 if plan.fits else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main(sys.argv[1:]))
