"""The Triton masked linear kernel (forward, dX, dW, db) against two references.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below unless already
set; it must be set before ``homodistil.kernels`` is imported). The interpreter is slow, so
the shapes are small and odd: M = 21 (3 × 7 tokens), K = 37, N = 29 with 16-wide tiles give
2 × 3 × 2 tiles, ragged edges, and live/masked runs that start mid-tile.
"""
import logging
import os
import subprocess
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from homodistil.kernels import _dispatch  # noqa: E402
from homodistil.kernels.masked_linear import (  # noqa: E402
    kernel_backend,
    masked_linear,
    masked_linear_reference,
)

LEAD, K, N = (3, 7), 37, 29

# Tolerance per dtype, as rtol and as atol relative to the largest expected magnitude. Both
# sides accumulate in fp32 and differ in summation order and in where they round:
# - fp32: order only; K ≤ 37 terms of O(1) → observed ≤ 4e-7, tolerance 1e-5.
# - fp16 (ulp 2⁻¹⁰ relative): outputs and dz round once on each side, sometimes to
#   neighbouring values; observed ≤ 5e-4 (about one ulp), tolerance 2e-3.
# - bf16 (ulp 2⁻⁷ relative): the same at 8× the ulp, and worse: the interpreter *truncates*
#   fp32 → bf16 (the GPU rounds to nearest), the reference rounds the pre-activation before
#   GELU, and one ulp of each dz_m moves dW = Σ_m dz_m·x_m by up to Σ_m |dz_m·x_m|·2⁻⁷,
#   which can be several ulps of a small, cancelling sum. Observed ≤ 2.7e-2 over ~300 seeded
#   cases (worst: one live row), tolerance 4e-2.
# A kernel bug (a skipped tile, a wrong gather) gives errors of O(1), far above all three.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-2}

# Mask patterns (out_mask over N rows, in_mask over K columns), built from a seeded generator.
PATTERNS = ["none", "all_true", "rows", "cols", "both", "all_but_one", "one_live",
            "tile_aligned", "no_live_rows", "no_live_cols"]


def make_masks(pattern: str, gen: torch.Generator):
    def random(n):
        m = torch.rand(n, generator=gen) < 0.55
        m[torch.randint(n, (1,), generator=gen)] = True  # at least one live
        return m

    def all_but(n, keep):
        m = torch.ones(n, dtype=torch.bool) if keep else torch.zeros(n, dtype=torch.bool)
        m[torch.randint(n, (1,), generator=gen)] = not keep
        return m

    def exactly(n, live):  # `live` live units, scattered
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[:live]] = True
        return m

    return {
        "none": (None, None),
        "all_true": (torch.ones(N, dtype=torch.bool), torch.ones(K, dtype=torch.bool)),
        "rows": (random(N), None),
        "cols": (None, random(K)),
        "both": (random(N), random(K)),
        "all_but_one": (all_but(N, True), all_but(K, True)),
        "one_live": (all_but(N, False), all_but(K, False)),
        "tile_aligned": (exactly(N, 16), exactly(K, 32)),  # live runs end exactly on a tile edge
        "no_live_rows": (torch.zeros(N, dtype=torch.bool), random(K)),
        "no_live_cols": (random(N), torch.zeros(K, dtype=torch.bool)),
    }[pattern]


def make_inputs(dtype, has_bias, gen):
    x = torch.randn(*LEAD, K, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype).requires_grad_()
    b = torch.randn(N, generator=gen).to(dtype).requires_grad_() if has_bias else None
    dy = torch.randn(*LEAD, N, generator=gen).to(dtype)
    return x, w, b, dy


def shrunk_linear(x, w, b, out_mask, in_mask, activation):
    """F.linear on the shrunk matrices (live rows × live columns), scattered back to N."""
    rows = torch.arange(N) if out_mask is None else out_mask.nonzero().squeeze(1)
    cols = torch.arange(K) if in_mask is None else in_mask.nonzero().squeeze(1)
    y = F.linear(x[..., cols], w[rows][:, cols], None if b is None else b[rows])
    if activation == "gelu":
        y = F.gelu(y)
    return y.new_zeros(*x.shape[:-1], N).index_copy(-1, rows, y)


def run(fn, x, w, b, dy, *args):
    """Output and (dX, dW, db) of fn; grads are reset so each call sees fresh leaves."""
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b, *args)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in (x, w, b)]


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    assert actual.dtype == expected.dtype, what
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_references(force_triton, pattern, has_bias, activation, dtype):
    case = f"{pattern}{has_bias}{activation}{dtype}"
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    out_mask, in_mask = make_masks(pattern, gen)
    x, w, b, dy = make_inputs(dtype, has_bias, gen)
    args = (out_mask, in_mask, activation)

    y, grads = run(masked_linear, x, w, b, dy, *args)
    assert y.shape == (*LEAD, N) and y.dtype == dtype
    y_ref, grads_ref = run(masked_linear_reference, x, w, b, dy, *args)
    y_shr, grads_shr = run(shrunk_linear, x, w, b, dy, *args)
    names = ("dX", "dW", "db")
    for ref_name, yr, gr in (("reference", y_ref, grads_ref),
                             ("shrunk F.linear", y_shr, grads_shr)):
        assert_close(y, yr, dtype, f"y vs {ref_name}")
        for name, g, g_r in zip(names, grads, gr):
            if g_r is None:
                assert g is None, name
            else:
                assert_close(g, g_r, dtype, f"{name} vs {ref_name}")

    # Masked entries are exactly zero, not merely small.
    dx, dw, db = grads
    if out_mask is not None:
        assert torch.count_nonzero(y[..., ~out_mask]) == 0
        assert torch.count_nonzero(dw[~out_mask]) == 0
        if db is not None:
            assert torch.count_nonzero(db[~out_mask]) == 0
    if in_mask is not None:
        assert torch.count_nonzero(dx[..., ~in_mask]) == 0
        assert torch.count_nonzero(dw[:, ~in_mask]) == 0


def test_triton_path_is_taken(force_triton):
    x, w, b, _ = make_inputs(torch.float32, True, torch.Generator().manual_seed(0))
    assert kernel_backend(x) == "triton"
    y = masked_linear(x, w, b)  # grad_fn: the view back to (3, 7, N) of the kernel's output
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_MaskedLinearFnBackward"


def test_noncontiguous_inputs_and_partial_grads(force_triton):
    """Strided x / W are copied (the interpreter misreads strided views); only requested
    grads are computed, and a frozen W with a trainable bias still gets its db."""
    gen = torch.Generator().manual_seed(1)
    out_mask, in_mask = make_masks("both", gen)
    x = torch.randn(K, 21, generator=gen).t().requires_grad_()  # (21, K), stride (1, 21)
    w = torch.randn(K, N, generator=gen).t().detach()  # frozen, non-contiguous
    b = torch.randn(N, generator=gen).requires_grad_()
    dy = torch.randn(21, N, generator=gen)
    args = (out_mask, in_mask, "gelu")
    y, (dx, dw, db) = run(masked_linear, x, w, b, dy, *args)
    y_ref, (dx_ref, _, db_ref) = run(masked_linear_reference, x, w, b, dy, *args)
    assert dw is None
    for name, a, e in (("y", y, y_ref), ("dX", dx, dx_ref), ("db", db, db_ref)):
        assert_close(a, e, torch.float32, name)


def test_one_dimensional_input(force_triton):
    gen = torch.Generator().manual_seed(2)
    x, w, b, _ = make_inputs(torch.float32, True, gen)
    out_mask, in_mask = make_masks("both", gen)
    x1 = x.detach()[0, 0]
    y = masked_linear(x1, w, b, out_mask, in_mask, "gelu")
    assert y.shape == (N,)
    assert_close(y, masked_linear_reference(x1, w, b, out_mask, in_mask, "gelu"),
                 torch.float32, "y")


def test_autocast_casts_operands(force_triton):
    """Under autocast the operands are cast like F.linear's; grads flow back to fp32."""
    gen = torch.Generator().manual_seed(3)
    x, w, b, _ = make_inputs(torch.float32, True, gen)
    out_mask, in_mask = make_masks("both", gen)
    outs = []
    for fn in (masked_linear, masked_linear_reference):
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b, out_mask, in_mask, None)
        y.float().sum().backward()
        outs.append((y, w.grad))
    (y, dw), (y_ref, dw_ref) = outs
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert_close(dw, dw_ref, torch.bfloat16, "dW")


@pytest.mark.parametrize("bad, match", [
    (dict(activation="relu"), "unsupported activation"),
    (dict(out_mask=torch.ones(N)), "out_mask must be a bool"),
    (dict(in_mask=torch.ones(K + 1, dtype=torch.bool)), "in_mask must be a bool"),
    (dict(bias=torch.zeros(N, dtype=torch.float64)), "bias is torch.float64"),
])
def test_rejects_bad_arguments(force_triton, bad, match):
    x, w, b, _ = make_inputs(torch.float32, True, torch.Generator().manual_seed(4))
    kwargs = dict(bias=b, out_mask=None, in_mask=None, activation=None) | bad
    with pytest.raises(ValueError, match=match):
        masked_linear(x, w, **kwargs)


def test_backend_choice_and_log(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_logged", set())
    x = torch.zeros(2, 3, requires_grad=True)
    caplog.set_level(logging.INFO, logger="homodistil.kernels")
    monkeypatch.delenv("HOMODISTIL_KERNELS", raising=False)
    assert kernel_backend(x) == "torch"  # a CPU tensor, nothing forced
    monkeypatch.setenv("HOMODISTIL_KERNELS", "torch")
    assert kernel_backend(x) == "torch"
    assert type(masked_linear(x, torch.ones(4, 3)).grad_fn).__name__ == "MmBackward0"
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")
    assert kernel_backend(x) == "triton"
    assert kernel_backend(x) == "triton"
    messages = [r.getMessage() for r in caplog.records if r.name == "homodistil.kernels"]
    assert len(messages) == 2, messages  # once per backend, not once per call
    assert "torch backend" in messages[0] and "triton backend" in messages[1]
    monkeypatch.setenv("HOMODISTIL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HOMODISTIL_KERNELS"):
        kernel_backend(x)


def test_empty_input_goes_to_reference(force_triton):
    _, w, b, _ = make_inputs(torch.float32, True, torch.Generator().manual_seed(5))
    y = masked_linear(torch.zeros(0, K), w, b, activation="gelu")
    assert y.shape == (0, N)


def test_compiled_kernel_refuses_cpu_tensor(monkeypatch):
    """Forcing Triton on CPU without the interpreter fails with a clear message."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    @triton.jit
    def compiled(x_ptr):
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.check_launchable(compiled, torch.zeros(1))


# The interpreter never compiles: this compiles every kernel variant for an H100 (sm_90,
# Triton's front-end, LLVM and the bundled ptxas; no GPU needed) in a fresh process without
# TRITON_INTERPRET, with the divisibility hints a BERT-shaped launch gets, so GPU-only
# failures (types, layouts, shared memory) show up in CI.
COMPILE_FOR_H100 = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from homodistil.kernels import masked_linear as ml

def compile_sm90(fn, signature, constexprs, **options):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    hints = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, t in signature.items() if t.startswith("*") or t == "i32"}
    triton.compile(ASTSource(fn, signature, constexprs, hints), target=GPUTarget("cuda", 90, 32),
                   options=options)

sizes = dict(M="i32", N="i32", K="i32", n_live="i32", k_live="i32")
# (dtype, GATHER_N, GATHER_K, flag for HAS_BIAS / GELU / SAVE_Z / DZ_FULL): each flag both ways
variants = [("bf16", False, False, False), ("bf16", True, False, True), ("bf16", False, True, True),
            ("bf16", True, True, False), ("fp32", True, True, True)]
for dt, gather_n, gather_k, flag in variants:
    P = "*" + dt
    meta = dict(GATHER_N=gather_n, GATHER_K=gather_k, PRECISION="ieee",
                DOT_DTYPE=tl.bfloat16 if dt == "bf16" else tl.float32,
                BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dt == "bf16" else 32)
    opts = dict(num_warps=8, num_stages=3)
    compile_sm90(ml._masked_linear_fwd_kernel,
                 dict(x_ptr=P, w_ptr=P, b_ptr=P, n_perm_ptr="*i32", k_perm_ptr="*i32", y_ptr=P,
                      z_ptr=P, **sizes, ldz="i32"),
                 dict(HAS_BIAS=flag, GELU=flag, SAVE_Z=flag, **meta), **opts)
    compile_sm90(ml._masked_linear_dx_kernel,
                 dict(dz_ptr=P, w_ptr=P, n_perm_ptr="*i32", k_perm_ptr="*i32", dx_ptr=P, **sizes,
                      ldz="i32"), dict(DZ_FULL=flag, **meta), **opts)
    compile_sm90(ml._masked_linear_dw_kernel,
                 dict(dz_ptr=P, x_ptr=P, n_perm_ptr="*i32", k_perm_ptr="*i32", dw_ptr=P,
                      db_ptr=P, **sizes, ldz="i32"), dict(HAS_BIAS=flag, DZ_FULL=flag, **meta),
                 **opts)
compile_sm90(ml._gelu_bwd_kernel, dict(dy_ptr="*bf16", z_ptr="*bf16", n_perm_ptr="*i32",
             dz_ptr="*bf16", M="i32", N="i32", n_live="i32", ldz="i32"),
             dict(GATHER_N=True, **ml._GELU_BWD_BLOCKS), num_warps=4)
"""


def test_kernels_compile_for_h100(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
