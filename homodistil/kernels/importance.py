"""Importance accumulation: one pass over a weight and its gradient -> row and column scores.

Element scores ``S`` per metric (all in fp32):
- ``magnitude``:   S = w²                         (the group score is sqrt of the group's sum)
- ``sensitivity``: S = |w · g|                    (first-order loss change, Molchanov et al.)
- ``platon``:      I = |w · g|;  Ī ← β1·Ī + (1−β1)·I;  U ← β2·U + (1−β2)·|I − Ī|;  S = Ī · U
                   (Zhang et al., PLATON, ICML 2022; Ī and U live in ``state`` and are
                   updated in place)
Returned: ``row[i] = Σ_j S[i, j]`` and ``col[j] = Σ_i S[i, j]``. A 1-D tensor is treated as
an (n, 1) matrix, so ``row`` is its element scores.

The Triton path fuses all of it into one pass (read w, g and the PLATON state once, write the
state once) and is deterministic: each program sums its tile into per-tile partial row and
column sums, which torch then reduces in a fixed order (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from homodistil.kernels._dispatch import check_launchable, kernel_backend, kernel_range

METRICS = ("magnitude", "sensitivity", "platon")


def init_state(weight: torch.Tensor, metric: str) -> dict[str, torch.Tensor]:
    """Per-element state a metric carries between steps (empty unless PLATON)."""
    if metric != "platon":
        return {}
    zeros = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return {"ema": zeros, "unc": zeros.clone()}


def importance_reference(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    metric: str,
    state: dict[str, torch.Tensor],
    beta1: float = 0.85,
    beta2: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference. weight/grad (N, K) or (N,), any float dtype -> fp32 (N,), (K,)."""
    w = weight.float()
    if w.dim() == 1:
        w = w.unsqueeze(1)
    if metric == "magnitude":
        score = w * w
    else:
        if grad is None:
            raise ValueError(f"metric {metric!r} needs a gradient")
        g = grad.float().reshape(w.shape)
        ipt = torch.mul(w, g).abs_()  # a new tensor: the in-place ops below only touch it (and the state)
        if metric == "sensitivity":
            score = ipt
        elif metric == "platon":
            # in place and into ipt's buffer: at a MiniLM-sized student on one CPU core, fresh
            # temporaries of every weight's size cost 4x the arithmetic (page faults)
            ema = state["ema"].view(w.shape)
            unc = state["unc"].view(w.shape)
            ema.lerp_(ipt, 1 - beta1)
            unc.lerp_(ipt.sub_(ema).abs_(), 1 - beta2)
            score = torch.mul(ema, unc, out=ipt)
        else:
            raise ValueError(f"unknown importance metric {metric!r} (known: {', '.join(METRICS)})")
    return score.sum(dim=1), score.sum(dim=0)


@triton.jit
def _importance_kernel(
    w_ptr,  # (N, K) weight, contiguous, any float dtype
    g_ptr,  # (N, K) gradient, contiguous, any float dtype (placeholder for magnitude)
    ema_ptr,  # (N, K) fp32 PLATON EMA Ī, updated in place (placeholder unless platon)
    unc_ptr,  # (N, K) fp32 PLATON uncertainty U, updated in place (placeholder unless platon)
    row_part_ptr,  # (cdiv(K, BLOCK_K), N) fp32 out: row sums of each column tile
    col_part_ptr,  # (cdiv(N, BLOCK_N), K) fp32 out: column sums of each row tile
    N, K,
    beta1, one_minus_beta1, beta2, one_minus_beta2,  # fp32; 1 − β precomputed, as torch's alpha
    METRIC: tl.constexpr,  # index into METRICS: 0 magnitude, 1 sensitivity, 2 platon
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); one (BLOCK_N, BLOCK_K) tile, fp32 math.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (r < N)[:, None] & (c < K)[None, :]
    offs = r.to(tl.int64)[:, None] * K + c[None, :]
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if METRIC == 0:
        score = w * w
    else:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ipt = tl.abs(w * g)
        if METRIC == 1:
            score = ipt
        else:
            ema = tl.load(ema_ptr + offs, mask=ok, other=0.0) * beta1 + one_minus_beta1 * ipt
            unc = (tl.load(unc_ptr + offs, mask=ok, other=0.0) * beta2
                   + one_minus_beta2 * tl.abs(ipt - ema))
            tl.store(ema_ptr + offs, ema, mask=ok)
            tl.store(unc_ptr + offs, unc, mask=ok)
            score = ema * unc
    score = tl.where(ok, score, 0.0)
    tl.store(row_part_ptr + pid_k * N + r, tl.sum(score, axis=1), mask=r < N)
    tl.store(col_part_ptr + pid_n * K + c, tl.sum(score, axis=0), mask=c < K)


def _blocks(n: int, k: int, interpreted: bool) -> tuple[int, int]:
    """Tile (BLOCK_N, BLOCK_K), each at least 16 (no degenerate aranges for (n, 1) vectors).

    Interpreter: 16 × 16, so the tests' small odd shapes span several tiles. GPU: up to
    256 columns and 8192 elements per tile: a BERT-base FFN matrix (768 × 3072) gives 288
    programs, enough to fill an H100; the partial sums stay ≤ 1/32 of the matrix.
    """
    if interpreted:
        return 16, 16
    block_k = max(16, min(256, triton.next_power_of_2(k)))
    return max(16, min(8192 // block_k, triton.next_power_of_2(n))), block_k


def importance_triton(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    metric: str,
    state: dict[str, torch.Tensor],
    beta1: float = 0.85,
    beta2: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path; same contract as :func:`importance_reference` (PLATON state in place).

    An empty weight goes to the reference (a Triton grid cannot be empty).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r} (known: {', '.join(METRICS)})")
    if weight.dim() not in (1, 2) or not weight.is_floating_point():
        raise ValueError(f"weight must be a 1-D or 2-D float tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:
        return importance_reference(weight, grad, metric, state, beta1, beta2)
    interpreted = check_launchable(_importance_kernel, weight)
    n, k = weight.shape if weight.dim() == 2 else (weight.shape[0], 1)
    w = weight.contiguous()
    g = ema = unc = w  # placeholders for the operands this metric does not read
    if metric != "magnitude":
        if grad is None:
            raise ValueError(f"metric {metric!r} needs a gradient")
        if grad.numel() != w.numel() or grad.device != w.device or not grad.is_floating_point():
            raise ValueError(f"grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) does not "
                             f"match weight ({tuple(weight.shape)} on {weight.device})")
        g = grad.reshape(w.shape).contiguous()
    if metric == "platon":
        ema, unc = state["ema"], state["unc"]
        for name, t in (("ema", ema), ("unc", unc)):  # updated in place: no silent copies
            if (t.dtype != torch.float32 or t.numel() != w.numel() or t.device != w.device
                    or not t.is_contiguous()):
                raise ValueError(f"state[{name!r}] must be a contiguous fp32 tensor of "
                                 f"{w.numel()} elements on {w.device}, got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
    block_n, block_k = _blocks(n, k, interpreted)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    row_part = torch.empty((grid[1], n), dtype=torch.float32, device=w.device)
    col_part = torch.empty((grid[0], k), dtype=torch.float32, device=w.device)
    _importance_kernel[grid](w, g, ema, unc, row_part, col_part, n, k,
                             beta1, 1 - beta1, beta2, 1 - beta2, METRIC=METRICS.index(metric),
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8)
    return row_part.sum(dim=0), col_part.sum(dim=0)


def importance(weight, grad, metric, state, beta1=0.85, beta2=0.95):
    """Dispatching entry point: the fused Triton kernel on CUDA (or when forced), else the
    reference."""
    with kernel_range("importance", weight):
        if kernel_backend(weight) == "torch":
            return importance_reference(weight, grad, metric, state, beta1, beta2)
        return importance_triton(weight, grad, metric, state, beta1, beta2)
