"""The fused LM losses (cross-entropy + τ²·KL at the scored positions) against their torch reference, forward and
backward, under Triton's interpreter, at odd shapes (vocabularies that are not a multiple of the chunk)."""
from __future__ import annotations

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
