"""Masked linear layer: ``y = act(x · (W ⊙ M)ᵀ + b) ⊙ m_out`` for a structured mask.

The mask is structured: ``out_mask`` (N,) marks live output rows of W, ``in_mask`` (K,) live
input columns. A masked row's output is exactly 0 (bias included), a masked column never
contributes. This equals ``F.linear`` on the shrunk matrices, scattered back to full width.

The Triton path skips masked work instead of multiplying zeros: each call compacts the live
indices once into a "live-first" permutation of the rows (and one of the columns), and every
GEMM program gathers its operands through it, so the reduction loops run over live
columns / rows only. Programs past the live range only write the exact zeros of the masked
outputs and gradients. Accumulation is fp32; inputs are bf16, fp16 or fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from homodistil.kernels._dispatch import check_launchable, kernel_backend, kernel_range

__all__ = ["masked_linear", "masked_linear_reference", "masked_linear_triton", "kernel_backend"]

ACTIVATIONS = (None, "gelu")
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def masked_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_mask: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Plain-torch reference. x (..., K), weight (N, K), bias (N,), masks bool -> y (..., N)."""
    if in_mask is not None:
        x = x * in_mask.to(x.dtype)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r} (supported: None, 'gelu')")
    if out_mask is not None:
        y = y * out_mask.to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Kernels. Shared conventions:
# - ``n_perm`` (N,) int32 lists the live output rows (ascending), then the masked ones;
#   ``k_perm`` (K,) int32 the same for input columns. A program's tile covers consecutive
#   *positions* of that order; ``n_live`` / ``k_live`` count the live positions. With
#   GATHER_N / GATHER_K False (no mask, or all live) the permutation is the identity and is
#   not loaded (the pointer is a placeholder).
# - Tiles along a masked dimension come in two runs: ``cdiv(n_live, BLOCK)`` live tiles over
#   positions [0, n_live), then ``cdiv(N - n_live, BLOCK)`` masked tiles over [n_live, N),
#   which run no reduction loop and write zeros.
# - DOT_DTYPE is the operand dtype of ``tl.dot``: the input dtype on GPU (tensor cores), fp32
#   under the interpreter (its bf16 dot is wrong). PRECISION is ``tl.dot``'s input_precision
#   for fp32 operands ("tf32" iff torch allows TF32 matmuls, else "ieee").
# - Row offsets are widened to int64: M·N passes 2³¹ at a few hundred thousand tokens.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_positions(pid, n_live, n_total, BLOCK: tl.constexpr):
    """Positions (BLOCK,) of tile ``pid`` in the live-first order, their validity, liveness."""
    live_tiles = tl.cdiv(n_live, BLOCK)
    is_live = pid < live_tiles
    start = tl.where(is_live, pid * BLOCK, n_live + (pid - live_tiles) * BLOCK)
    end = tl.where(is_live, n_live, n_total)
    pos = start + tl.arange(0, BLOCK)
    return pos, pos < end, is_live


@triton.jit
def _gather(perm_ptr, pos, valid, GATHER: tl.constexpr):
    """Row/column ids at ``pos`` of the live-first order (identity when not GATHER)."""
    if GATHER:
        ids = tl.load(perm_ptr + pos, mask=valid, other=0)
    else:
        ids = pos
    return ids


@triton.jit
def _masked_linear_fwd_kernel(
    x_ptr,  # (M, K) input, contiguous, bf16/fp16/fp32
    w_ptr,  # (N, K) weight, contiguous, dtype of x
    b_ptr,  # (N,) bias, dtype of x (placeholder unless HAS_BIAS)
    n_perm_ptr,  # (N,) int32 live-first output rows (placeholder unless GATHER_N)
    k_perm_ptr,  # (K,) int32 live-first input columns; only the first k_live are read
    y_ptr,  # (M, N) output, dtype of x: every element is written (masked rows: exact 0)
    z_ptr,  # (M, ldz) pre-activation of the live rows (first n_live columns), if SAVE_Z
    M, N, K,  # problem size
    n_live, k_live,  # live output rows / input columns
    ldz,  # row stride of z: n_live rounded up to 16 (aligned rows, vectorized access)
    HAS_BIAS: tl.constexpr, GATHER_N: tl.constexpr, GATHER_K: tl.constexpr,
    GELU: tl.constexpr, SAVE_Z: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), live + masked tiles of N); one (BLOCK_M, BLOCK_N) tile of y.
    pid_m = tl.program_id(0)
    p, p_ok, n_is_live = _tile_positions(tl.program_id(1), n_live, N, BLOCK_N)
    rows = _gather(n_perm_ptr, p, p_ok, GATHER_N).to(tl.int64)  # (BLOCK_N,) ids in W / y
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Reduce over live input columns only; masked tiles skip the loop (acc stays 0).
    k_end = tl.where(n_is_live, k_live, 0)
    for k0 in range(0, k_end, BLOCK_K):
        q = k0 + tl.arange(0, BLOCK_K)
        q_ok = q < k_live
        cols = _gather(k_perm_ptr, q, q_ok, GATHER_K)  # (BLOCK_K,)
        a = tl.load(x_ptr + m64[:, None] * K + cols[None, :],
                    mask=m_ok[:, None] & q_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        wt = tl.load(w_ptr + rows[None, :] * K + cols[:, None],
                     mask=q_ok[:, None] & p_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = Wᵀ
        acc = tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)

    live_cols = p < n_live  # = p_ok & n_is_live (a block & scalar mask breaks the interpreter)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=live_cols, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if SAVE_Z:
        tl.store(z_ptr + m64[:, None] * ldz + p[None, :], acc.to(z_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & live_cols[None, :])
    if GELU:  # exact erf GELU, as F.gelu(approximate="none"); gelu(0) = 0 keeps masked rows 0
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(y_ptr + m64[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient, contiguous, dtype of x
    z_ptr,  # (M, ldz) pre-activation saved by the forward (first n_live columns)
    n_perm_ptr,  # (N,) int32 live-first output rows (placeholder unless GATHER_N)
    dz_ptr,  # (M, ldz) out: dy[:, live rows] · gelu'(z), dtype of x, live rows compacted
    M, N, n_live, ldz,
    GATHER_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), cdiv(n_live, BLOCK_N)); elementwise, fp32 math.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < n_live
    rows = _gather(n_perm_ptr, j, j_ok, GATHER_N)
    m64 = m.to(tl.int64)
    ok = (m < M)[:, None] & j_ok[None, :]
    dy = tl.load(dy_ptr + m64[:, None] * N + rows[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + m64[:, None] * ldz + j[None, :], mask=ok, other=0.0).to(tl.float32)
    # d/dz [z·Φ(z)] = Φ(z) + z·φ(z), the formula of torch's GeluBackward (approximate="none")
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(dz_ptr + m64[:, None] * ldz + j[None, :],
             (dy * (cdf + z * pdf)).to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _masked_linear_dx_kernel(
    dz_ptr,  # (M, ldz) gradient of the pre-activation, dtype of x
    w_ptr,  # (N, K) weight, contiguous
    n_perm_ptr,  # (N,) int32 live-first output rows; only the first n_live are read
    k_perm_ptr,  # (K,) int32 live-first input columns (placeholder unless GATHER_K)
    dx_ptr,  # (M, K) out: dz · W over live rows; masked columns exact 0
    M, N, K, n_live, k_live,
    ldz,  # row stride of dz: N when DZ_FULL (dz is dy itself), else n_live rounded up to 16
    GATHER_N: tl.constexpr, GATHER_K: tl.constexpr, DZ_FULL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), live + masked tiles of K); one (BLOCK_M, BLOCK_K) tile of dx.
    pid_m = tl.program_id(0)
    q, q_ok, k_is_live = _tile_positions(tl.program_id(1), k_live, K, BLOCK_K)
    cols = _gather(k_perm_ptr, q, q_ok, GATHER_K)  # (BLOCK_K,) ids in W / dx
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_end = tl.where(k_is_live, n_live, 0)
    for n0 in range(0, n_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < n_live
        rows = _gather(n_perm_ptr, j, j_ok, GATHER_N).to(tl.int64)  # (BLOCK_N,)
        if DZ_FULL:
            dz_cols = rows
        else:
            dz_cols = j
        g = tl.load(dz_ptr + m64[:, None] * ldz + dz_cols[None, :],
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :],
                    mask=j_ok[:, None] & q_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dx_ptr + m64[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & q_ok[None, :])


@triton.jit
def _masked_linear_dw_kernel(
    dz_ptr,  # (M, ldz) gradient of the pre-activation, dtype of x
    x_ptr,  # (M, K) input, contiguous
    n_perm_ptr,  # (N,) int32 live-first output rows (placeholder unless GATHER_N)
    k_perm_ptr,  # (K,) int32 live-first input columns (placeholder unless GATHER_K)
    dw_ptr,  # (N, K) out: dzᵀ · x on live rows × live columns, exact 0 elsewhere
    db_ptr,  # (N,) out: Σ_m dz over live rows, 0 on masked rows (written iff HAS_BIAS)
    M, N, K, n_live, k_live,
    ldz,  # row stride of dz: N when DZ_FULL, else n_live rounded up to 16
    HAS_BIAS: tl.constexpr, GATHER_N: tl.constexpr, GATHER_K: tl.constexpr,
    DZ_FULL: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (live + masked tiles of N, live + masked tiles of K); one (BLOCK_N, BLOCK_K) tile
    # of dw. The programs with pid_k == 0 also own db for their rows: a fixed-order sum over
    # M inside one program, so db is deterministic (no atomics).
    pid_k = tl.program_id(1)
    p, p_ok, n_is_live = _tile_positions(tl.program_id(0), n_live, N, BLOCK_N)
    q, q_ok, k_is_live = _tile_positions(pid_k, k_live, K, BLOCK_K)
    rows = _gather(n_perm_ptr, p, p_ok, GATHER_N).to(tl.int64)
    cols = _gather(k_perm_ptr, q, q_ok, GATHER_K)
    if DZ_FULL:
        dz_cols = rows
    else:
        dz_cols = p
    x_cols_ok = q < k_live  # = q_ok & k_is_live: a masked K tile reads no x (only for db)

    # Live rows reduce over M when their K tile is live, or to produce db. Only when every
    # column is masked is pid_k == 0 a masked K tile; its dot then adds zeros.
    if HAS_BIAS:
        reduces = n_is_live & (k_is_live | (pid_k == 0))
    else:
        reduces = n_is_live & k_is_live
    m_end = tl.where(reduces, M, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        m64 = m.to(tl.int64)
        gt = tl.load(dz_ptr + m64[None, :] * ldz + dz_cols[:, None],
                     mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_M) = dzᵀ
        a = tl.load(x_ptr + m64[:, None] * K + cols[None, :],
                    mask=m_ok[:, None] & x_cols_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = tl.dot(gt.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(gt.to(tl.float32), axis=1)
    tl.store(dw_ptr + rows[:, None] * K + cols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=p_ok[:, None] & q_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + rows, db.to(db_ptr.dtype.element_ty), mask=p_ok)


# Block sizes. Under the interpreter: the smallest tl.dot tile (16), so the tests' small odd
# shapes span several tiles. On GPU: autotuned once per (N, K, dtypes), on first use; every
# kernel only writes its outputs (never accumulates into them), so the autotuner's repeated
# launches are harmless.
_INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
_GELU_BWD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=128)
_GPU_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
                             (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
]


def _autotuned(kernel):
    return triton.autotune(configs=_GPU_CONFIGS, key=["N", "K"])(kernel)


_fwd_tuned = _autotuned(_masked_linear_fwd_kernel)
_dx_tuned = _autotuned(_masked_linear_dx_kernel)
_dw_tuned = _autotuned(_masked_linear_dw_kernel)


def _launch(kernel, tuned, interpreted: bool, grid, *args, **meta) -> None:
    """Launch ``kernel`` with the interpreter's blocks, or its autotuned GPU version."""
    if interpreted:
        kernel[grid](*args, **meta, **_INTERPRET_BLOCKS)
    else:
        tuned[grid](*args, **meta)


def _live_first(mask: torch.Tensor | None, n: int, name: str,
                device: torch.device) -> tuple[torch.Tensor | None, int]:
    """Live-first permutation (n,) int32 of a bool mask, and the live count.

    None when every unit is live (the kernels then skip the gather). One host sync per mask.
    """
    if mask is None:
        return None, n
    if mask.dtype != torch.bool or mask.shape != (n,) or mask.device != device:
        raise ValueError(f"{name} must be a bool tensor of shape ({n},) on {device}, "
                         f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
    live = mask.nonzero().squeeze(1)
    if live.numel() == n:
        return None, n
    dead = (~mask).nonzero().squeeze(1)
    return torch.cat([live, dead]).to(torch.int32), live.numel()


def _aligned(n: int) -> int:
    """Row stride for an (M, n) scratch buffer: n rounded up to 16 elements. Triton
    specializes integer arguments divisible by 16, and only then vectorizes row accesses."""
    return -(-n // 16) * 16


def _tiles(live: int, total: int, block: int) -> int:
    """Live tiles + masked tiles along one dimension (see the kernels' grid comments)."""
    return triton.cdiv(live, block) + triton.cdiv(total - live, block)


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


def _dot_meta(x: torch.Tensor, interpreted: bool) -> dict:
    """``tl.dot`` operand dtype and fp32 precision for inputs like ``x`` (see kernel notes)."""
    dot_dtype = tl.float32 if interpreted else _TL_DTYPES[x.dtype]
    return dict(DOT_DTYPE=dot_dtype, PRECISION=fp32_dot_precision())


class _MaskedLinearFn(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; x (M, K), weight (N, K) contiguous, same dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_perm, n_live, k_perm, k_live, gelu):
        interpreted = check_launchable(_masked_linear_fwd_kernel, x)
        M, K = x.shape
        N = weight.shape[0]
        save_z = gelu and any(ctx.needs_input_grad[:3])
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        ldz = _aligned(n_live)
        z = torch.empty((M, ldz), dtype=x.dtype, device=x.device) if save_z else None
        meta = _dot_meta(x, interpreted)
        _launch(_masked_linear_fwd_kernel, _fwd_tuned, interpreted,
                lambda c: (triton.cdiv(M, c["BLOCK_M"]), _tiles(n_live, N, c["BLOCK_N"])),
                x, weight, x if bias is None else bias,  # placeholders are never read
                weight if n_perm is None else n_perm, weight if k_perm is None else k_perm,
                y, y if z is None else z, M, N, K, n_live, k_live, ldz,
                HAS_BIAS=bias is not None, GATHER_N=n_perm is not None,
                GATHER_K=k_perm is not None, GELU=gelu, SAVE_Z=save_z, **meta)
        ctx.save_for_backward(x, weight, n_perm, k_perm, z)
        ctx.sizes = (n_live, k_live)
        ctx.meta = meta
        ctx.interpreted = interpreted
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, n_perm, k_perm, z = ctx.saved_tensors
        n_live, k_live = ctx.sizes
        interpreted, meta = ctx.interpreted, ctx.meta
        M, K = x.shape
        N = weight.shape[0]
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy = dy.contiguous()  # e.g. the expanded (stride 0) gradient of a .sum()
        gather_n, gather_k = n_perm is not None, k_perm is not None
        n_perm_arg = weight if n_perm is None else n_perm  # placeholders are never read
        k_perm_arg = weight if k_perm is None else k_perm

        if z is not None:  # GELU: dz = dy · gelu'(z) once, compacted to the live rows
            ldz = z.shape[1]
            dz = torch.empty((M, ldz), dtype=dy.dtype, device=dy.device)
            if n_live:  # (no live row: dz is empty, and a Triton grid cannot be)
                b = _INTERPRET_BLOCKS if interpreted else _GELU_BWD_BLOCKS
                grid = (triton.cdiv(M, b["BLOCK_M"]), triton.cdiv(n_live, b["BLOCK_N"]))
                _gelu_bwd_kernel[grid](dy, z, n_perm_arg, dz, M, N, n_live, ldz, GATHER_N=gather_n,
                                       BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"])
            dz_full = False
        else:  # no activation: the kernels read the live columns of dy directly
            dz, dz_full, ldz = dy, True, N

        dx = dw = db = None
        if need_dx:
            dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
            with kernel_range("masked_linear.dx", dx):
                _launch(_masked_linear_dx_kernel, _dx_tuned, interpreted,
                        lambda c: (triton.cdiv(M, c["BLOCK_M"]), _tiles(k_live, K, c["BLOCK_K"])),
                        dz, weight, n_perm_arg, k_perm_arg, dx, M, N, K, n_live, k_live, ldz,
                        GATHER_N=gather_n, GATHER_K=gather_k, DZ_FULL=dz_full, **meta)
        if need_dw or need_db:  # db rides on the dW kernel (a frozen W with a trained bias
            # still pays for dW: rare enough not to need its own kernel)
            dw = torch.empty_like(weight)
            db = torch.empty((N,), dtype=weight.dtype, device=weight.device) if need_db else None
            with kernel_range("masked_linear.dw", dw):
                _launch(_masked_linear_dw_kernel, _dw_tuned, interpreted,
                        lambda c: (_tiles(n_live, N, c["BLOCK_N"]), _tiles(k_live, K, c["BLOCK_K"])),
                        dz, x, n_perm_arg, k_perm_arg, dw, dw if db is None else db,
                        M, N, K, n_live, k_live, ldz, HAS_BIAS=need_db, GATHER_N=gather_n,
                        GATHER_K=gather_k, DZ_FULL=dz_full, **meta)
            dw = dw if need_dw else None
        return dx, dw, db, None, None, None, None, None


def masked_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_mask: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Triton path; same contract as :func:`masked_linear_reference` (differentiable).

    x (..., K), weight (N, K), bias (N,) share one dtype (bf16, fp16, fp32) and device;
    masks are bool (N,) / (K,). Non-contiguous inputs are copied (the kernels, and above all
    the interpreter, assume row-major contiguous tensors). Empty inputs go to the reference
    (a Triton grid cannot be empty).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r} (supported: None, 'gelu')")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., K) and weight (N, K) disagree: {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype} (supported: bf16, fp16, fp32)")
    if x.numel() == 0 or weight.numel() == 0:
        return masked_linear_reference(x, weight, bias, out_mask, in_mask, activation)
    n_perm, n_live = _live_first(out_mask, N, "out_mask", x.device)
    k_perm, k_live = _live_first(in_mask, K, "in_mask", x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    y = _MaskedLinearFn.apply(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                              n_perm, n_live, k_perm, k_live, activation == "gelu")
    return y.view(*lead, N)


def masked_linear(x, weight, bias=None, out_mask=None, in_mask=None, activation=None):
    """Dispatching entry point: the Triton kernels on CUDA (or when forced), else the reference.

    Under autocast the operands are cast to the autocast dtype first, as ``F.linear`` would.
    """
    with kernel_range("masked_linear.forward", x):
        if kernel_backend(x) == "torch":
            return masked_linear_reference(x, weight, bias, out_mask, in_mask, activation)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return masked_linear_triton(x, weight, bias, out_mask, in_mask, activation)
