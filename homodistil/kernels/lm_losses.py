"""The vocabulary-sized losses in one pass: cross-entropy and τ²·KL(p_T ‖ p_S) at the scored positions.

For M scored positions (masked tokens for MLM, next tokens for a causal LM) and a vocabulary of V:

    lm   = mean_m [ logsumexp(s_m) − s_m[y_m] ]
    kl   = τ² · mean_m Σ_v p_T(v) · (log p_T(v) − log p_S(v)),   p_X = softmax(x_m / τ)
    loss = α_lm · lm + α_pred · kl
    ∂loss/∂s_m = α_lm/M · (softmax(s_m) − onehot(y_m)) + α_pred·τ/M · (p_S − p_T)

The torch reference (:func:`lm_losses_reference`, what ``engine.losses`` computed before) upcasts
both (M, V) logits to fp32 and keeps several fp32 (M, V) intermediates alive for autograd (the two
log-softmaxes, the KL's elementwise product, the cross-entropy's own log-softmax). The Triton
kernel reads the student's and the teacher's logits in their own dtype (bf16 in training), keeps
every fp32 value in registers, computes both losses and writes the gradient once, in the logits'
dtype, in the same launch: one program per scored row, two passes over the row (online
log-sum-exps, then the sums and the gradient). Nothing of size (M, V) is allocated but the
gradient. The backward only scales that gradient by the incoming one.

This module knows tensors, not models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from homodistil.kernels._dispatch import check_launchable, kernel_backend, kernel_range


def lm_losses_reference(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor,
                        alpha_lm: float, alpha_pred: float, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, lm, kl) in fp32 with plain torch; ``lm`` (``kl``) is None when its α is 0.

    s_logits, t_logits (M, V); labels (M,) token ids (every row is scored).
    """
    lm = F.cross_entropy(s_logits.float(), labels) if alpha_lm else None
    kl = None
    if alpha_pred:
        log_p_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
        log_p_t = F.log_softmax(t_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
    loss = sum(a * v for a, v in ((alpha_lm, lm), (alpha_pred, kl)) if v is not None)
    return loss, lm, kl


@triton.jit
def _lm_losses_kernel(s_ptr, t_ptr, grad_ptr, label_ptr, lm_ptr, kl_ptr, V, stride_s, stride_t, stride_g,
                      inv_tau, lm_grad_scale, kl_grad_scale,
                      HAS_LM: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, g_row = s_ptr + row * stride_s, t_ptr + row * stride_t, grad_ptr + row * stride_g
    # pass 1: online max and sum of exponentials of s (CE), s/τ and t/τ (KL); all fp32 in registers
    m_s, d_s = float("-inf"), 0.0
    m_q, d_q = float("-inf"), 0.0
    m_t, d_t = float("-inf"), 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        if HAS_LM:
            new = tl.maximum(m_s, tl.max(s, axis=0))
            d_s = d_s * tl.exp(m_s - new) + tl.sum(tl.exp(s - new), axis=0)
            m_s = new
        if HAS_KL:
            q = s * inv_tau
            new = tl.maximum(m_q, tl.max(q, axis=0))
            d_q = d_q * tl.exp(m_q - new) + tl.sum(tl.exp(q - new), axis=0)
            m_q = new
            t = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_tau
            new = tl.maximum(m_t, tl.max(t, axis=0))
            d_t = d_t * tl.exp(m_t - new) + tl.sum(tl.exp(t - new), axis=0)
            m_t = new
    if HAS_LM:  # a constexpr branch: its names exist only where the same branch reads them
        lse_s = m_s + tl.log(d_s)
    if HAS_KL:
        lse_q = m_q + tl.log(d_q)
        lse_t = m_t + tl.log(d_t)
    label = tl.load(label_ptr + row)
    # pass 2: the KL sum and the gradient, written once in the logits' dtype
    kl = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        s = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
        grad = tl.zeros((BLOCK_V,), dtype=tl.float32)
        if HAS_LM:
            grad += lm_grad_scale * (tl.exp(s - lse_s) - tl.where(cols == label, 1.0, 0.0))
        if HAS_KL:
            log_p_s = s * inv_tau - lse_q
            log_p_t = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_t
            p_t = tl.where(ok, tl.exp(log_p_t), 0.0)
            kl += tl.sum(p_t * (log_p_t - log_p_s), axis=0)
            grad += kl_grad_scale * (tl.exp(log_p_s) - p_t)
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)
    if HAS_LM:
        tl.store(lm_ptr + row, lse_s - tl.load(s_row + label).to(tl.float32))
    if HAS_KL:
        tl.store(kl_ptr + row, kl)


def _block_v(v: int, interpreted: bool) -> int:
    """Columns per chunk: up to 4096 (a 30k-50k vocabulary in 8-13 chunks; registers hold a few fp32 chunks). Under
    the interpreter, 64 for the tests' small odd vocabularies (so that they span several chunks), and 4096 for a
    real one (the interpreter pays per chunk, not per element: a recipe test with MiniLM's 30,522 words would
    otherwise run 477 chunks per row and pass)."""
    if interpreted and v <= 2048:
        return 64
    return min(4096, triton.next_power_of_2(v))


def lm_losses_triton(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor,
                     alpha_lm: float, alpha_pred: float, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(loss, lm, kl, grad): the forward of :class:`LMLosses`, and ∂loss/∂s_logits in the logits' dtype."""
    if s_logits.dim() != 2 or labels.shape != s_logits.shape[:1]:
        raise ValueError(f"logits must be (M, V) and labels (M,), got {tuple(s_logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if alpha_pred and (t_logits is None or t_logits.shape != s_logits.shape or t_logits.device != s_logits.device):
        raise ValueError(f"teacher logits must match the student's {tuple(s_logits.shape)}, got "
                         f"{None if t_logits is None else tuple(t_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    m, v = s_logits.shape
    s = s_logits if s_logits.stride(-1) == 1 else s_logits.contiguous()
    t = s if not alpha_pred else (t_logits if t_logits.stride(-1) == 1 else t_logits.contiguous())
    y = labels.contiguous()
    grad = torch.empty_like(s, memory_format=torch.contiguous_format)  # (M, V), the logits' dtype
    lm_rows = torch.empty(m, dtype=torch.float32, device=s.device)
    kl_rows = torch.empty(m, dtype=torch.float32, device=s.device)
    if m:
        interpreted = check_launchable(_lm_losses_kernel, s)
        block = _block_v(v, interpreted)
        _lm_losses_kernel[(m,)](s, t, grad, y, lm_rows, kl_rows, v, s.stride(0), t.stride(0), grad.stride(0),
                                1.0 / temperature, alpha_lm / m, alpha_pred * temperature / m,
                                HAS_LM=bool(alpha_lm), HAS_KL=bool(alpha_pred), BLOCK_V=block,
                                num_warps=8 if block >= 2048 else 4)  # ~16 fp32 values per thread per chunk
    n = max(m, 1)
    lm = lm_rows.sum() / n if alpha_lm else None
    kl = kl_rows.sum() * (temperature**2 / n) if alpha_pred else None
    loss = sum(a * x for a, x in ((alpha_lm, lm), (alpha_pred, kl)) if x is not None)
    return loss, lm, kl, grad


class LMLosses(torch.autograd.Function):
    """``loss`` differentiable in the student's logits; ``lm`` and ``kl`` are its terms, for logging only."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, labels, alpha_lm, alpha_pred, temperature):
        loss, lm, kl, grad = lm_losses_triton(s_logits, t_logits, labels, alpha_lm, alpha_pred, temperature)
        ctx.save_for_backward(grad)
        zero = loss.new_zeros(())
        lm, kl = (zero if x is None else x for x in (lm, kl))
        ctx.mark_non_differentiable(lm, kl)
        return loss, lm, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_lm, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None  # no host sync, no new (M, V)


def lm_losses(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor,
              alpha_lm: float, alpha_pred: float, temperature: float
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Dispatching entry point, ``(loss, lm, kl)`` as :func:`lm_losses_reference`: the fused Triton kernel on CUDA
    (or when forced), else the reference."""
    with kernel_range("lm_losses", s_logits):
        if kernel_backend(s_logits) == "torch":
            return lm_losses_reference(s_logits, t_logits, labels, alpha_lm, alpha_pred, temperature)
        loss, lm, kl = LMLosses.apply(s_logits, t_logits, labels, alpha_lm, alpha_pred, temperature)
        return loss, lm if alpha_lm else None, kl if alpha_pred else None
