"""The masked linear layer's Triton and cuBLAS paths (forward, dX, dW, db) against two
references, its dispatch threshold, its pinned launch configs and the TF32 read.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below unless already
set; it must be set before ``homodistil.kernels`` is imported). With
``HOMODISTIL_TEST_DEVICE=cuda`` and ``TRITON_INTERPRET=0`` the same tests run the compiled
kernels on a GPU (``benchmarks/gpu_check.sh``). The interpreter is slow, so the shapes are
small and odd: M = 21 (3 × 7 tokens), K = 37, N = 29 with 16-wide tiles give 2 × 3 × 2
tiles, ragged edges, and live/masked runs that start mid-tile.
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
from homodistil.kernels import masked_linear as ml  # noqa: E402
from homodistil.kernels.masked_linear import (  # noqa: E402
    kernel_backend,
    masked_linear,
    masked_linear_reference,
    masked_linear_triton,
    prepare_rows,
)

DEVICE = os.environ.get("HOMODISTIL_TEST_DEVICE", "cpu")
if DEVICE == "cuda":  # IEEE fp32 on both sides (TF32 would need a 1e-3 tolerance)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
LEAD, K, N = (3, 7), 37, 29

# Tolerance per dtype, as rtol and as atol relative to the largest expected magnitude. Both
# sides accumulate in fp32 and differ in summation order and in where they round:
# - fp32: order only; K ≤ 37 terms of O(1) → observed ≤ 4e-7, tolerance 1e-5.
# - fp16 (ulp 2⁻¹⁰ relative): outputs round once on each side, sometimes to neighbouring
#   values; observed ≤ 5e-4 (about one ulp), tolerance 2e-3.
# - bf16 (ulp 2⁻⁷ relative): the same at 8× the ulp, and worse: the interpreter *truncates*
#   fp32 → bf16 (the GPU rounds to nearest), and one ulp of a product moves a small,
#   cancelling sum by several of its ulps. Tolerance 4e-2.
# A kernel bug (a skipped tile, a wrong gather) gives errors of O(1), far above all three.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-2}

# Output-row mask patterns (training masks output rows only), from a seeded generator.
PATTERNS = ["all_true", "rows", "all_but_one", "one_live", "tile_aligned", "no_live_rows"]


def make_mask(pattern: str, gen: torch.Generator) -> torch.Tensor:
    m = torch.ones(N, dtype=torch.bool)
    if pattern == "rows":
        m = torch.rand(N, generator=gen) < 0.55
        m[torch.randint(N, (1,), generator=gen)] = True  # at least one live
    elif pattern == "all_but_one":
        m[torch.randint(N, (1,), generator=gen)] = False
    elif pattern == "one_live":
        m = torch.zeros(N, dtype=torch.bool)
        m[torch.randint(N, (1,), generator=gen)] = True
    elif pattern == "tile_aligned":  # the live run ends exactly on a tile edge
        m = torch.zeros(N, dtype=torch.bool)
        m[torch.randperm(N, generator=gen)[:16]] = True
    elif pattern == "no_live_rows":
        m = torch.zeros(N, dtype=torch.bool)
    return m.to(DEVICE)


def make_inputs(dtype, has_bias, gen):
    x = torch.randn(*LEAD, K, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(N, generator=gen).to(DEVICE, dtype).requires_grad_() if has_bias else None
    dy = torch.randn(*LEAD, N, generator=gen).to(DEVICE, dtype)
    return x, w, b, dy


def shrunk_linear(x, w, b, rows):
    """F.linear on the shrunk matrix (live rows), scattered back to N."""
    live = rows.keep.nonzero().squeeze(1)
    y = F.linear(x, w[live], None if b is None else b[live])
    return y.new_zeros(*x.shape[:-1], N).index_copy(-1, live, y)


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


PATHS = {"triton": masked_linear_triton}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_matches_references(path, pattern, has_bias, dtype):
    case = f"{pattern}{has_bias}{dtype}"
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    rows = prepare_rows(make_mask(pattern, gen))
    x, w, b, dy = make_inputs(dtype, has_bias, gen)

    y, grads = run(PATHS[path], x, w, b, dy, rows)
    assert y.shape == (*LEAD, N) and y.dtype == dtype
    y_ref, grads_ref = run(masked_linear_reference, x, w, b, dy, rows)
    y_shr, grads_shr = run(shrunk_linear, x, w, b, dy, rows)
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
    _, dw, db = grads
    dead = ~rows.keep
    assert torch.count_nonzero(y[..., dead]) == 0
    assert torch.count_nonzero(dw[dead]) == 0
    if db is not None:
        assert torch.count_nonzero(db[dead]) == 0


def test_prepare_rows_is_live_first():
    keep = torch.tensor([False, True, True, False, True])
    rows = prepare_rows(keep)
    assert rows.perm.tolist() == [1, 2, 4, 0, 3] and rows.perm.dtype == torch.int32
    assert rows.live.tolist() == [1, 2, 4] and rows.n_live == 3
    assert rows.masked_fraction == pytest.approx(0.4)
    with pytest.raises(ValueError, match="1-D bool"):
        prepare_rows(torch.ones(5))


def test_dw_split_over_tokens_is_deterministic_and_exact(force_triton):
    """dW sums per-split fp32 partials in a fixed order: bitwise the same on every call, and
    equal to the reference (M = 200 tokens in 16-row blocks gives several splits)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, K, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(N, K, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(200, N, generator=gen).to(DEVICE)
    rows = prepare_rows(make_mask("rows", gen))
    bm, bn, bk, _, _ = ml.gpu_config(torch.float32, interpreted=DEVICE == "cpu")
    splits, chunk = ml.dw_splits(200, rows.n_live, K, bm, bn, bk)
    assert splits > 1 and chunk % bm == 0 and (splits - 1) * chunk < 200 <= splits * chunk
    dws = [run(masked_linear_triton, x, w, None, dy, rows)[1][1].clone() for _ in range(2)]
    assert torch.equal(dws[0], dws[1])
    _, (_, dw_ref, _) = run(masked_linear_reference, x, w, None, dy, rows)
    assert_close(dws[0], dw_ref, torch.float32, "dW")


def test_pinned_configs_are_a_function_of_the_shape():
    """No autotuning: the launch config and dW's split depend only on dtype and shape, so
    every rank and a resumed run (a fresh process: the subprocess) sum in the same order."""
    shapes = [(8192, 3010, 768), (8192, 768, 3072), (21, 17, 37), (1, 1, 16)]
    here = [(ml.gpu_config(dt), ml.dw_splits(*s, *ml.gpu_config(dt)[:3]))
            for dt in (torch.bfloat16, torch.float32) for s in shapes]
    code = ("import torch; from homodistil.kernels import masked_linear as ml; "
            f"print([(ml.gpu_config(dt), ml.dw_splits(*s, *ml.gpu_config(dt)[:3])) "
            f"for dt in (torch.bfloat16, torch.float32) for s in {shapes!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TRITON_INTERPRET="0")).stdout
    assert out.strip() == str(here)
    assert ml.gpu_config(torch.bfloat16) == (128, 128, 64, 8, 3)
    # BERT-base FFN dW: 24 × 12 = 288 tiles already fill the target, no split; a 768 × 768
    # attention dW: 72 tiles, 264 // 72 = 3 splits of 22 blocks of 128 tokens.
    assert ml.dw_splits(8192, 3072, 768, 128, 128, 64) == (1, 8192)
    assert ml.dw_splits(8192, 768, 768, 128, 128, 64) == (3, 2816)
    assert ml.dw_splits(100, 5, 5, 16, 16, 16) == (7, 16)  # one tile: split to every block
    assert not hasattr(ml, "_fwd_tuned")  # no triton.autotune wrappers left


def test_dispatch_threshold():
    """Triton runs from the smallest masked fraction where it beat cuBLAS at that and every
    larger measured fraction; on the H200 table it lost everywhere, so never (unless forced)."""
    assert ml.triton_threshold() is None
    assert not any(ml.use_triton(f) for f in (0.0, 0.02, 0.05, 0.25, 0.5, 0.9))
    wins_late = {0.0: (2.0, 1.0), 0.25: (1.5, 1.0), 0.5: (0.9, 1.0), 0.75: (0.5, 1.0)}
    assert ml.triton_threshold(wins_late) == 0.5
    assert [ml.use_triton(f, wins_late) for f in (0.3, 0.5, 0.6, 0.95)] == [False, True, True, True]
    # A win below a loss does not count: the threshold is where it keeps winning.
    islands = {0.0: (0.9, 1.0), 0.25: (1.5, 1.0), 0.5: (0.8, 1.0)}
    assert ml.triton_threshold(islands) == 0.5
    assert ml.triton_threshold({0.0: (0.5, 1.0), 0.5: (0.5, 1.0)}) == 0.0
    assert ml.triton_threshold({0.5: (1.0, 1.0)}) is None  # a tie is not a win


def test_dispatch_picks_the_measured_path_on_cuda_unless_forced(monkeypatch):
    """auto on a CUDA tensor: F.linear × mask (the threshold says Triton never wins); forced:
    Triton; auto on CPU: the reference (the same function)."""
    calls = []
    for name in ("masked_linear_triton", "masked_linear_reference"):
        monkeypatch.setattr(ml, name, lambda *a, _n=name: calls.append(_n))
    rows = prepare_rows(torch.tensor([True, False]))
    x, w = torch.zeros(3, 2), torch.zeros(2, 2)
    monkeypatch.delenv("HOMODISTIL_KERNELS", raising=False)
    monkeypatch.setattr(ml, "kernel_backend", lambda t: "triton")  # as on CUDA
    masked_linear(x, w, None, rows)
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")
    masked_linear(x, w, None, rows)
    monkeypatch.setattr(ml, "kernel_backend", lambda t: "torch")
    masked_linear(x, w, None, rows)
    assert calls == ["masked_linear_reference", "masked_linear_triton", "masked_linear_reference"]


class _Matmul:
    """A stand-in for ``torch.backends.cuda.matmul`` with the attributes of one torch API."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


@pytest.mark.parametrize("attrs, generic, want", [
    (dict(fp32_precision="tf32", allow_tf32=None), "ieee", "tf32"),  # new API, set
    (dict(fp32_precision="ieee", allow_tf32=None), "tf32", "ieee"),
    (dict(fp32_precision="none"), "tf32", "tf32"),  # inherits torch.backends.fp32_precision
    (dict(fp32_precision="none"), "none", "ieee"),
    (dict(allow_tf32=True), None, "tf32"),  # old API only (torch < 2.9)
    (dict(allow_tf32=False), None, "ieee"),
], ids=["new-tf32", "new-ieee", "new-inherit-tf32", "new-inherit-none", "old-tf32", "old-ieee"])
def test_fp32_dot_precision_under_both_torch_apis(monkeypatch, attrs, generic, want):
    """The new API is read first and the legacy flag never once it exists (reading it raises
    after transformers sets fp32_precision: modelled by allow_tf32=None raising below)."""
    class Strict(_Matmul):
        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if name == "allow_tf32" and value is None:
                raise RuntimeError("legacy allow_tf32 read after fp32_precision was set")
            return value

    monkeypatch.setattr(torch.backends.cuda, "matmul", Strict(**attrs))
    if generic is not None:
        monkeypatch.setattr(torch.backends, "fp32_precision", generic, raising=False)
    assert ml.fp32_dot_precision() == want


def test_fp32_dot_precision_with_the_real_torch(monkeypatch):
    """The installed torch (new API): setting fp32_precision as transformers does is read."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert ml.fp32_dot_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert ml.fp32_dot_precision() == "ieee"
    finally:
        matmul.fp32_precision = before


def test_triton_path_is_taken(force_triton):
    x, w, b, _ = make_inputs(torch.float32, True, torch.Generator().manual_seed(0))
    assert kernel_backend(x) == "triton"
    y = masked_linear(x, w, b, prepare_rows(torch.ones(N, dtype=torch.bool, device=DEVICE)))
    # grad_fn: the view back to (3, 7, N) of the kernel's output
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_MaskedLinearFnBackward"


@pytest.mark.parametrize("path", sorted(PATHS))
def test_noncontiguous_inputs_and_partial_grads(path):
    """Strided x / W (GPT-2's Conv1D passes Wᵀ) work; only requested grads are computed,
    and a frozen W with a trainable bias still gets its db."""
    gen = torch.Generator().manual_seed(1)
    rows = prepare_rows(make_mask("rows", gen))
    x = torch.randn(K, 21, generator=gen).to(DEVICE).t().requires_grad_()  # (21, K), strided
    w = torch.randn(K, N, generator=gen).to(DEVICE).t().detach()  # frozen, non-contiguous
    b = torch.randn(N, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(21, N, generator=gen).to(DEVICE)
    y, (dx, dw, db) = run(PATHS[path], x, w, b, dy, rows)
    y_ref, (dx_ref, _, db_ref) = run(masked_linear_reference, x, w, b, dy, rows)
    assert dw is None
    for name, a, e in (("y", y, y_ref), ("dX", dx, dx_ref), ("db", db, db_ref)):
        assert_close(a, e, torch.float32, name)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_dimensional_input(path):
    gen = torch.Generator().manual_seed(2)
    x, w, b, _ = make_inputs(torch.float32, True, gen)
    rows = prepare_rows(make_mask("rows", gen))
    x1 = x.detach()[0, 0]
    y = PATHS[path](x1, w, b, rows)
    assert y.shape == (N,)
    assert_close(y, masked_linear_reference(x1, w, b, rows), torch.float32, "y")


def test_autocast_casts_operands(force_triton):
    """Under autocast the operands are cast like F.linear's; grads flow back to fp32."""
    gen = torch.Generator().manual_seed(3)
    x, w, b, _ = make_inputs(torch.float32, True, gen)
    rows = prepare_rows(make_mask("rows", gen))
    outs = []
    for fn in (masked_linear, masked_linear_reference):
        w.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(x, w, b, rows)
        y.float().sum().backward()
        outs.append((y, w.grad))
    (y, dw), (y_ref, dw_ref) = outs
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert_close(dw, dw_ref, torch.bfloat16, "dW")


@pytest.mark.parametrize("bad, match", [
    (dict(rows=prepare_rows(torch.ones(N + 1, dtype=torch.bool))), r"row mask must have shape"),
    (dict(bias=torch.zeros(N + 1)), r"bias must have shape"),
    (dict(bias=torch.zeros(N, dtype=torch.float64)), "bias is torch.float64"),
])
def test_rejects_bad_arguments(force_triton, bad, match):
    x, w, b, _ = make_inputs(torch.float32, True, torch.Generator().manual_seed(4))
    kwargs = dict(bias=b, rows=prepare_rows(torch.ones(N, dtype=torch.bool))) | bad
    kwargs = {k: v._replace(keep=v.keep.to(DEVICE)) if k == "rows" else v.to(DEVICE)
              for k, v in kwargs.items()}
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
    y = masked_linear(x, torch.ones(4, 3), None, prepare_rows(torch.tensor([True, False] * 2)))
    assert type(y.grad_fn).__name__ == "MulBackward0"  # the reference: F.linear(...) · m
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
    rows = prepare_rows(torch.ones(N, dtype=torch.bool, device=DEVICE))
    y = masked_linear(torch.zeros(0, K, device=DEVICE), w, b, rows)
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
# TRITON_INTERPRET, with the pinned configs and the divisibility hints a BERT-shaped launch
# gets, so GPU-only failures (types, layouts, shared memory) show up in CI.
COMPILE_FOR_H100 = """
import torch
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

sizes = dict(M="i32", K="i32", n_live="i32")
for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    P = "*" + dt
    bm, bn, bk, warps, stages = ml.gpu_config(dtype)
    meta = dict(PRECISION="tf32" if dt == "fp32" else "ieee",
                DOT_DTYPE=tl.bfloat16 if dt == "bf16" else tl.float32,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    opts = dict(num_warps=warps, num_stages=stages)
    for has_bias in (False, True):
        compile_sm90(ml._masked_linear_fwd_kernel,
                     dict(x_ptr=P, w_ptr=P, b_ptr=P, perm_ptr="*i32", y_ptr=P, N="i32", **sizes),
                     dict(HAS_BIAS=has_bias, **meta), **opts)
    compile_sm90(ml._masked_linear_dx_kernel,
                 dict(dz_ptr=P, w_ptr=P, perm_ptr="*i32", dx_ptr=P, **sizes), meta, **opts)
    compile_sm90(ml._masked_linear_dw_kernel,
                 dict(dz_ptr=P, x_ptr=P, part_ptr="*fp32", **sizes, chunk="i32"), meta, **opts)
"""


def test_kernels_compile_for_h100(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
