"""The fused LM losses (cross-entropy + τ²·KL at the scored positions) against their torch reference, forward and
backward, under Triton's interpreter, at odd shapes (vocabularies that are not a multiple of the chunk)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from homodistil.kernels.lm_losses import LMLosses, lm_losses, lm_losses_reference, lm_losses_triton

# per logits dtype: (rtol, atol as a fraction of the reference's largest magnitude). fp32: summation order only.
# bf16: the logits are rounded to bf16 before both paths see them, so the losses agree closely; the gradient is
# stored in bf16 (8 bits of mantissa: ~4e-3 relative).
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 8e-3)}
SHAPES = [(1, 17), (5, 64), (7, 333), (3, 1000)]


def _inputs(m: int, v: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(m, v, generator=gen)).to(dtype)
    t = (3 * torch.randn(m, v, generator=gen)).to(dtype)
    y = torch.randint(0, v, (m,), generator=gen)
    return s, t, y


def _close(actual, expected, dtype):
    rtol, scale = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol,
                               atol=scale * float(expected.float().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,v", SHAPES)
@pytest.mark.parametrize("alpha_lm,alpha_pred,tau", [(1.0, 1.0, 1.0), (0.5, 2.0, 2.0), (1.0, 0.0, 1.0),
                                                     (0.0, 1.0, 0.5)])
def test_forward_and_backward_match_the_reference(m, v, dtype, alpha_lm, alpha_pred, tau):
    s, t, y = _inputs(m, v, dtype)
    s_ref = s.clone().requires_grad_()
    loss_ref, lm_ref, kl_ref = lm_losses_reference(s_ref, t, y, alpha_lm, alpha_pred, tau)
    (3 * loss_ref).backward()  # a non-unit incoming gradient
    s_fused = s.clone().requires_grad_()
    loss, lm, kl = LMLosses.apply(s_fused, t, y, alpha_lm, alpha_pred, tau)
    (3 * loss).backward()
    _close(loss, loss_ref.detach(), torch.float32 if dtype == torch.float32 else torch.bfloat16)
    for got, ref in ((lm, lm_ref), (kl, kl_ref)):
        if ref is None:
            assert float(got) == 0.0
        else:
            _close(got, ref.detach(), dtype)
    assert s_fused.grad.dtype == dtype  # the gradient is written in the logits' dtype: no fp32 (M, V) copy
    _close(s_fused.grad, s_ref.grad, dtype)


def test_the_kernel_allocates_only_the_gradient():
    """Nothing of size (M, V) but the gradient: the forward's tensors are the gradient and (M,) row sums."""
    s, t, y = _inputs(5, 333, torch.bfloat16)
    loss, lm, kl, grad = lm_losses_triton(s, t, y, 1.0, 1.0, 2.0)
    assert grad.shape == s.shape and grad.dtype == torch.bfloat16
    assert loss.dtype == lm.dtype == kl.dtype == torch.float32 and loss.dim() == 0


def test_dispatch_follows_the_backend(monkeypatch):
    s, t, y = _inputs(4, 97, torch.float32, seed=1)
    monkeypatch.setenv("HOMODISTIL_KERNELS", "torch")
    ref = lm_losses(s, t, y, 1.0, 1.0, 1.0)
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")
    fused = lm_losses(s, t, y, 1.0, 1.0, 1.0)
    for a, b in zip(fused, ref):
        _close(a, b, torch.float32)
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")
    assert lm_losses(s, None, y, 1.0, 0.0, 1.0)[2] is None  # no KL term without its α (and no teacher logits)


def test_bad_shapes_are_refused():
    s, t, y = _inputs(4, 97, torch.float32)
    with pytest.raises(ValueError, match="teacher logits"):
        lm_losses_triton(s, t[:, :50], y, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        lm_losses_triton(s, t, y[:3], 1.0, 1.0, 1.0)


# The interpreter never compiles: compile the kernel for an H100 (sm_90; Triton's front-end, LLVM and the bundled
# ptxas, no GPU needed) in a fresh process without TRITON_INTERPRET, for each pair of terms, at the chunk the GPU
# path picks for BERT's and Llama-3's vocabularies, in bf16.
COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from homodistil.kernels import lm_losses as k

signature = dict(s_ptr="*bf16", t_ptr="*bf16", grad_ptr="*bf16", label_ptr="*i64", lm_ptr="*fp32", kl_ptr="*fp32",
                 V="i32", stride_s="i32", stride_t="i32", stride_g="i32", inv_tau="fp32", lm_grad_scale="fp32",
                 kl_grad_scale="fp32", HAS_LM="constexpr", HAS_KL="constexpr", BLOCK_V="constexpr")
for has_lm, has_kl in [(True, True), (True, False), (False, True)]:
    for vocab in (30522, 128256):
        block = k._block_v(vocab, interpreted=False)
        triton.compile(ASTSource(k._lm_losses_kernel, signature, dict(HAS_LM=has_lm, HAS_KL=has_kl, BLOCK_V=block)),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
"""


def test_kernel_compiles_for_h100(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
