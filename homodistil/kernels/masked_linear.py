"""Masked linear layer: ``y = (x · Wᵀ + b) ⊙ m`` for an output-row mask ``m``.

Training only ever masks output units (``pruning.masked``), so that is the only mask here:
``m`` (N,) marks the live output rows of W; a masked row's output is exactly 0 (bias
included) and its weight and bias gradients are exactly 0. This equals ``F.linear`` on the
shrunk matrix, scattered back to full width.

The mask is prepared once per mask update (:func:`prepare_rows`: one host sync), never per
call. Two implementations share that contract:

- :func:`masked_linear_reference`: ``F.linear(x, W, b) · m`` (the definition): cuBLAS GEMMs
  plus one (M, N) multiply, forward and backward. Measured on an H200 (docs/gpu.md), it is
  the fastest masked path at every masked fraction, so it is also the default on CUDA.
  (``F.linear(x, W ⊙ m, b ⊙ m)`` with its own backward was measured too: faster forward,
  1.1-1.9× slower forward+backward; removed.)
- :func:`masked_linear_triton`: Triton kernels that skip masked rows: the forward GEMM runs
  over the live rows of a live-first permutation and writes exact zeros elsewhere; the
  backward compacts dy's live columns once, computes dx over them, and dW with a
  deterministic split over tokens (fixed-order sum of per-split fp32 partials); the bias
  gradient is a torch sum outside the kernels.

:func:`masked_linear` dispatches: the Triton kernels when forced (``HOMODISTIL_KERNELS=triton``)
or, on CUDA, where :func:`use_triton` says they won on a GPU; the reference otherwise. Block sizes are pinned per dtype (:func:`gpu_config`): no autotuning, so every
rank and every resumed run launches the same tiles and sums in the same order.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from homodistil.kernels._dispatch import (check_launchable, forced_backend, kernel_backend,
                                         kernel_range)

__all__ = ["RowMask", "prepare_rows", "masked_linear", "masked_linear_reference",
           "masked_linear_triton", "use_triton", "triton_threshold",
           "gpu_config", "dw_splits", "fp32_dot_precision", "kernel_backend"]

logger = logging.getLogger("homodistil.kernels")
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class RowMask(NamedTuple):
    """An output-row mask prepared for the kernels (see :func:`prepare_rows`)."""

    keep: torch.Tensor  # (N,) bool, True = live
    perm: torch.Tensor  # (N,) int32: live rows ascending, then masked rows ascending
    live: torch.Tensor  # (n_live,) int64 live rows ascending (= perm[:n_live])
    n_live: int

    @property
    def masked_fraction(self) -> float:
        return 1.0 - self.n_live / self.keep.numel()


def prepare_rows(keep: torch.Tensor) -> RowMask:
    """Prepare a bool (N,) output mask once per mask update: one host sync (the live count)."""
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise ValueError(f"the row mask must be a 1-D bool tensor, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    live = keep.nonzero().squeeze(1)
    perm = torch.cat([live, (~keep).nonzero().squeeze(1)]).to(torch.int32)
    return RowMask(keep, perm, live, live.numel())


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows: RowMask) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., K) and weight (N, K) disagree: {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if rows.keep.shape != (N,) or rows.keep.device != weight.device:
        raise ValueError(f"the row mask must have shape ({N},) on {weight.device}, got "
                         f"{tuple(rows.keep.shape)} on {rows.keep.device}")


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, rows: RowMask) -> torch.Tensor:
    """Plain-torch reference. x (..., K), weight (N, K), bias (N,) -> y (..., N)."""
    _check(x, weight, bias, rows)
    y = F.linear(x, weight, bias)
    return y * rows.keep.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# When the Triton kernels run. The table holds fwd+bwd microseconds of the BERT-base FFN pair
# (up 768→3072 plus down 3072→768) at 8192 tokens, bf16, rows-only masks, measured on an
# NVIDIA H200 (torch 2.11, triton 3.6) by part b of benchmarks/gpu_check.sh (docs/gpu.md):
# masked fraction -> (Triton masked GEMM, F.linear × mask).
# ---------------------------------------------------------------------------------------------
MEASURED_FFN_US: dict[float, tuple[float, float]] = {
    0.00: (1108.864 + 838.976, 465.264 + 333.056),
    0.02: (1555.840 + 1057.616, 330.400 + 356.144),
    0.05: (1524.864 + 1046.816, 330.272 + 239.168),
    0.25: (909.728 + 714.080, 329.280 + 265.824),
    0.50: (749.248 + 626.432, 329.632 + 224.288),
}


def triton_threshold(measured: dict[float, tuple[float, float]] = MEASURED_FFN_US) -> float | None:
    """The smallest measured masked fraction from which Triton beat cuBLAS at that and every
    larger measured fraction; None where it lost at the largest one (then it never runs
    unless forced). On :data:`MEASURED_FFN_US`: None (Triton lost everywhere, 2.5-3.8×)."""
    threshold = None
    for fraction in sorted(measured, reverse=True):
        triton_us, mask_mul_us = measured[fraction]
        if triton_us >= mask_mul_us:
            break
        threshold = fraction
    return threshold


def use_triton(masked_fraction: float,
               measured: dict[float, tuple[float, float]] = MEASURED_FFN_US) -> bool:
    """Whether the Triton kernels win at ``masked_fraction`` (above the largest measured
    fraction the last measurement holds)."""
    threshold = triton_threshold(measured)
    return threshold is not None and masked_fraction >= threshold


# ---------------------------------------------------------------------------------------------
# Triton kernels. Shared conventions:
# - ``perm`` (N,) int32 lists the live output rows, then the masked ones (RowMask.perm);
#   ``n_live`` counts the live ones. Forward tiles along N come in two runs: cdiv(n_live, BN)
#   live tiles over positions [0, n_live), then cdiv(N - n_live, BN) masked tiles over
#   [n_live, N), which run no reduction loop and write zeros.
# - The backward reads ``dz`` (M, n_live): dy's live columns, compacted once, contiguous.
# - DOT_DTYPE is ``tl.dot``'s operand dtype: the input dtype on GPU (tensor cores), fp32 under
#   the interpreter (its bf16 dot is wrong). PRECISION is ``tl.dot``'s input_precision for
#   fp32 operands ("tf32" iff torch's fp32 matmuls may use TF32, else "ieee").
# - Row offsets are widened to int64: M·N passes 2³¹ at a few hundred thousand tokens.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _masked_linear_fwd_kernel(
    x_ptr,  # (M, K) input, contiguous, bf16/fp16/fp32
    w_ptr,  # (N, K) weight, contiguous, dtype of x
    b_ptr,  # (N,) bias, dtype of x (placeholder unless HAS_BIAS)
    perm_ptr,  # (N,) int32 live-first rows
    y_ptr,  # (M, N) out, dtype of x: every element written (masked rows: exact 0)
    M, N, K, n_live,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), live + masked tiles of N); one (BLOCK_M, BLOCK_N) tile of y.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    live_tiles = tl.cdiv(n_live, BLOCK_N)
    is_live = pid_n < live_tiles
    start = tl.where(is_live, pid_n * BLOCK_N, n_live + (pid_n - live_tiles) * BLOCK_N)
    p = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions in the live-first order
    p_ok = p < tl.where(is_live, n_live, N)
    rows = tl.load(perm_ptr + p, mask=p_ok, other=0).to(tl.int64)  # (BLOCK_N,) ids in W / y
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(is_live, K, 0)  # masked tiles skip the reduction: acc stays 0
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_ptr + m64[:, None] * K + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        wt = tl.load(w_ptr + rows[None, :] * K + k[:, None],
                     mask=k_ok[:, None] & p_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = Wᵀ
        acc = tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        live_rows = p < n_live  # (a block & scalar mask breaks the interpreter)
        acc += tl.load(b_ptr + rows, mask=live_rows, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m64[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _masked_linear_dx_kernel(
    dz_ptr,  # (M, n_live) dy's live columns, contiguous, dtype of x
    w_ptr,  # (N, K) weight, contiguous
    perm_ptr,  # (N,) int32 live-first rows; only the first n_live are read
    dx_ptr,  # (M, K) out: dz · W[live]
    M, K, n_live,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); one (BLOCK_M, BLOCK_K) tile of dx.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok, k_ok = m < M, k < K
    m64 = m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n_live, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < n_live
        rows = tl.load(perm_ptr + j, mask=j_ok, other=0).to(tl.int64)  # (BLOCK_N,)
        g = tl.load(dz_ptr + m64[:, None] * n_live + j[None, :],
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = tl.load(w_ptr + rows[:, None] * K + k[None, :],
                    mask=j_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dx_ptr + m64[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _masked_linear_dw_kernel(
    dz_ptr,  # (M, n_live) dy's live columns, contiguous
    x_ptr,  # (M, K) input, contiguous
    part_ptr,  # (SPLITS, n_live, K) fp32 out: split s holds Σ_{m in its chunk} dzᵀ x
    M, K, n_live,
    chunk,  # tokens per split, a multiple of BLOCK_M
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(n_live, BLOCK_N), cdiv(K, BLOCK_K), SPLITS); one (BLOCK_N, BLOCK_K) tile of
    # one split's partial dW over the compacted live rows. The caller sums the splits in a
    # fixed order (no atomics: deterministic).
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    j_ok, k_ok = j < n_live, k < K
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_end
        m64 = m.to(tl.int64)
        gt = tl.load(dz_ptr + m64[None, :] * n_live + j[:, None],
                     mask=j_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_M) = dzᵀ
        a = tl.load(x_ptr + m64[:, None] * K + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = tl.dot(gt.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    base = split.to(tl.int64) * n_live * K
    tl.store(part_ptr + base + j.to(tl.int64)[:, None] * K + k[None, :], acc,
             mask=j_ok[:, None] & k_ok[None, :])


# Pinned launch configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand dtype,
# the same for all three kernels and every shape (a row mask changes n_live, never the
# config). No autotuning: a first-use tuning pass stalled each new shape for seconds on an
# H200, and ranks timing their own choices may pick different tiles, i.e. different
# summation orders. 128×128 tiles with a 64-deep (16-bit) or 32-deep (fp32) K step use
# 96 KiB of shared memory at 3 stages, within sm_80's and sm_90's limits.
# Under the interpreter: the smallest tl.dot tile (16), so the tests' small odd shapes span
# several tiles.
_GPU_CONFIGS = {
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float16: (128, 128, 64, 8, 3),
    # fp32: BLOCK_N 64, since dW stages a (BLOCK_M, BLOCK_N) dz tile and a (BLOCK_M, BLOCK_K) x tile:
    # at 128 x 128 x 32 and 3 stages that is 240 KiB of shared memory, over the H200's 227 KiB
    # (seen on the device with TF32 dots)
    torch.float32: (128, 64, 32, 8, 3),
}
_INTERPRET_CONFIG = (16, 16, 16, 1, 1)
# dW splits over tokens until about this many programs run (two waves of 132 SMs), at most
# _MAX_SPLITS: a constant, not the device's SM count, so the order of the sum is the same
# on every GPU.
_DW_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16


def gpu_config(dtype: torch.dtype, interpreted: bool = False) -> tuple[int, int, int, int, int]:
    """Pinned (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for operands of ``dtype``."""
    if interpreted:
        return _INTERPRET_CONFIG
    if dtype not in _GPU_CONFIGS:
        raise TypeError(f"unsupported dtype {dtype} (supported: bf16, fp16, fp32)")
    return _GPU_CONFIGS[dtype]


def dw_splits(M: int, n_live: int, K: int, block_m: int, block_n: int,
              block_k: int) -> tuple[int, int]:
    """(splits, chunk): dW's reduction over M tokens in ``splits`` chunks of ``chunk`` tokens
    (a multiple of ``block_m``), a pure function of the shape, hence of no rank or run."""
    tiles = triton.cdiv(n_live, block_n) * triton.cdiv(K, block_k)
    blocks_m = triton.cdiv(M, block_m)
    splits = max(1, min(_MAX_SPLITS, blocks_m, _DW_TARGET_PROGRAMS // max(tiles, 1)))
    chunk = triton.cdiv(blocks_m, splits) * block_m
    return triton.cdiv(M, chunk), chunk


def fp32_dot_precision() -> str:
    """``"tf32"`` or ``"ieee"`` for fp32 ``tl.dot``, following torch's cuBLAS setting.

    The new API (``torch.backends.cuda.matmul.fp32_precision``, torch ≥ 2.9) is read first:
    once it has been set (``transformers`` does), reading the legacy ``allow_tf32`` raises.
    ``"none"`` inherits the generic ``torch.backends.fp32_precision``; ``"none"`` there too
    means torch's default, IEEE fp32.
    """
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: only the legacy flag exists
        return "tf32" if matmul.allow_tf32 else "ieee"
    precision = matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return "tf32" if precision == "tf32" else "ieee"


def _launch_meta(x: torch.Tensor, interpreted: bool) -> dict:
    """Constexprs and launch options for operands like ``x`` (see the kernel notes)."""
    bm, bn, bk, warps, stages = gpu_config(x.dtype, interpreted)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                DOT_DTYPE=tl.float32 if interpreted else _TL_DTYPES[x.dtype],
                PRECISION=fp32_dot_precision())
    if not interpreted:
        meta.update(num_warps=warps, num_stages=stages)
    return meta


class _MaskedLinearFn(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; x (M, K), weight (N, K) contiguous, same dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows: RowMask):
        interpreted = check_launchable(_masked_linear_fwd_kernel, x)
        M, K = x.shape
        N = weight.shape[0]
        meta = _launch_meta(x, interpreted)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(M, meta["BLOCK_M"]),
                triton.cdiv(rows.n_live, meta["BLOCK_N"]) + triton.cdiv(N - rows.n_live, meta["BLOCK_N"]))
        _masked_linear_fwd_kernel[grid](x, weight, x if bias is None else bias, rows.perm, y,
                                        M, N, K, rows.n_live, HAS_BIAS=bias is not None, **meta)
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.meta, ctx.has_bias = rows, meta, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (M, N)
        x, weight = ctx.saved_tensors
        rows, meta = ctx.rows, ctx.meta
        M, K = x.shape
        N, n_live = weight.shape[0], rows.n_live
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dz = dy.index_select(1, rows.live)  # (M, n_live): dy's live columns, compacted once
        dx = dw = db = None
        if need_dx:
            dx = x.new_empty((M, K)) if n_live else x.new_zeros((M, K))
            if n_live:  # (a Triton grid cannot be empty)
                grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
                with kernel_range("masked_linear.dx", dx):
                    _masked_linear_dx_kernel[grid](dz, weight, rows.perm, dx, M, K, n_live, **meta)
        if need_dw:
            dw = torch.zeros_like(weight)
            if n_live:
                splits, chunk = dw_splits(M, n_live, K, meta["BLOCK_M"], meta["BLOCK_N"],
                                          meta["BLOCK_K"])
                part = torch.empty((splits, n_live, K), dtype=torch.float32, device=x.device)
                grid = (triton.cdiv(n_live, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]), splits)
                with kernel_range("masked_linear.dw", dw):
                    _masked_linear_dw_kernel[grid](dz, x, part, M, K, n_live, chunk, **meta)
                dw.index_copy_(0, rows.live, part.sum(0).to(dw.dtype))  # fixed-order sum
        if need_db and ctx.has_bias:
            db = torch.zeros((N,), dtype=weight.dtype, device=weight.device)
            db.index_copy_(0, rows.live, dz.float().sum(0).to(db.dtype))
        return dx, dw, db, None


def masked_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, rows: RowMask) -> torch.Tensor:
    """Triton path; same contract as :func:`masked_linear_reference` (differentiable).

    x (..., K), weight (N, K), bias (N,) share one dtype (bf16, fp16, fp32) and device.
    Non-contiguous inputs are copied (the kernels, and above all the interpreter, assume
    row-major contiguous tensors). Empty inputs go to the reference (a Triton grid cannot be
    empty).
    """
    _check(x, weight, bias, rows)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype} (supported: bf16, fp16, fp32)")
    if x.numel() == 0 or weight.numel() == 0:
        return masked_linear_reference(x, weight, bias, rows)
    N, K = weight.shape
    lead = x.shape[:-1]
    y = _MaskedLinearFn.apply(x.reshape(-1, K).contiguous(), weight.contiguous(),
                              None if bias is None else bias.contiguous(), rows)
    return y.view(*lead, N)


_logged_paths: set[str] = set()


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: RowMask) -> torch.Tensor:
    """Dispatching entry point (see the module notes). Under autocast the operands are cast
    to the autocast dtype first, as ``F.linear`` would."""
    with kernel_range("masked_linear.forward", x):
        return _masked_linear(x, weight, bias, rows)


def _masked_linear(x, weight, bias, rows):
    if kernel_backend(x) == "torch":
        return masked_linear_reference(x, weight, bias, rows)
    if forced_backend() == "triton" or use_triton(rows.masked_fraction):
        path, fn = "triton", masked_linear_triton
    else:
        path, fn = "F.linear × mask", masked_linear_reference
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("homodistil masked_linear: %s path (Triton wins from masked fraction %s "
                    "on the measured table)", path, triton_threshold())
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return fn(x, weight, bias, rows)
