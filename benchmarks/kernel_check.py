"""The compiled Triton kernel (fused importance) against its torch reference on one CUDA GPU.

The CPU tests run it under ``TRITON_INTERPRET=1``; this runs it compiled, at an odd shape
(ragged tiles), in fp32 and bf16, for every element score. It also sets
``torch.backends.cuda.matmul.fp32_precision`` the way ``transformers`` does, then calls the
kernel again (the old ``allow_tf32`` read raises after that in torch ≥ 2.9).
Prints one line per case and a summary; exits 1 on any mismatch or error.

    python benchmarks/kernel_check.py
"""
from __future__ import annotations

import sys
import traceback

import torch

TOL = {torch.float32: 2e-3, torch.bfloat16: 4e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def fresh_state(w: torch.Tensor, score: str) -> dict[str, torch.Tensor]:
    """PLATON's zero EMA and uncertainty for ``ema_uncertainty``; no state for the other scores."""
    if score != "ema_uncertainty":
        return {}
    return {"ema": torch.zeros(w.shape, device=w.device), "unc": torch.zeros(w.shape, device=w.device)}


def check_importance(dtype, score, gen) -> float:
    from homodistil.kernels.importance import importance_reference, importance_triton

    n, k = 517, 771
    w = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    errs = []
    states = [fresh_state(w, score), fresh_state(w, score)]
    for _ in range(3):
        g = None if score == "square" else torch.randn(n, k, generator=gen, device="cuda").to(dtype)
        got = importance_triton(w, g, score, states[0])
        want = importance_reference(w, g, score, states[1])
        errs += [rel_err(a, b) for a, b in zip(got, want)]
    return max(errs)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_check: no CUDA GPU; the CPU tests run these kernels under TRITON_INTERPRET=1")
        return 0
    import triton

    from homodistil.kernels.importance import SCORES

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    cases = []
    for precision in ("default", "fp32_precision=tf32"):
        if precision != "default":
            torch.backends.cuda.matmul.fp32_precision = "tf32"  # what transformers does
        for dtype in (torch.float32, torch.bfloat16):
            for score in SCORES:
                cases.append((f"importance {precision} {dtype} {score}", dtype,
                              lambda d=dtype, sc=score: check_importance(d, sc, gen)))
        for name, dtype, fn in cases:
            try:
                err = fn()
                ok = err <= TOL[dtype]
                print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {err:.2e} (tol {TOL[dtype]:.0e})")
                failures += not ok
            except Exception as e:  # report every case, not only the first broken one
                failures += 1
                print(f"ERR  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(limit=3)
        cases = []
    print(f"kernel_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
