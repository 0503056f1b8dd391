"""The fused Triton importance kernel against the plain-torch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below unless already
set; it must be set before ``homodistil.kernels`` is imported); with
``HOMODISTIL_TEST_DEVICE=cuda`` and ``TRITON_INTERPRET=0`` the same tests run the compiled
kernel on a GPU (``benchmarks/gpu_check.sh``). Shapes are small and odd so
that 16 × 16 tiles leave ragged edges: (29, 37) spans 2 × 3 tiles, (45,) three row tiles.
"""
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from homodistil.kernels.importance import (  # noqa: E402
    SCORES,
    importance,
    importance_reference,
)

DEVICE = os.environ.get("HOMODISTIL_TEST_DEVICE", "cpu")
SHAPES = [(29, 37), (45,)]
STEPS = 4

# Everything is fp32 math on both sides, so the only differences are rounding order: the
# PLATON update may be fused (FMA) differently by torch and the kernel (≤ 1 ulp per step,
# observed ≤ 1.2e-7 absolute on values of O(0.1) over 4 steps), and the kernel sums each
# row / column in tiles then adds the tiles (observed ≤ 3e-7 relative). rtol 1e-5 leaves a
# wide margin; a wrong formula, β, tile or state write gives errors of O(1e-2) or more.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("HOMODISTIL_KERNELS", "triton")


def init_state(weight, score):
    """PLATON's state (EMA and uncertainty, zero) where the score keeps one, shaped like ``weight``."""
    if score != "ema_uncertainty":
        return {}
    return {"ema": torch.zeros(weight.shape, device=weight.device), "unc": torch.zeros(weight.shape, device=weight.device)}


def run_steps(fn, weight, grads, score, betas):
    """Scores of each step, and the final state, starting from a fresh state."""
    state = init_state(weight, score)
    scores = [fn(weight, g, score, state, *betas) for g in grads]
    return scores, state


def make_steps(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    # A gradient may come in a different dtype than its weight (fp32 master grads).
    grads = [torch.randn(shape, generator=gen).to(DEVICE, dtype if i % 2 else torch.float32)
             for i in range(STEPS)]
    return weight, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
@pytest.mark.parametrize("score", SCORES)
def test_matches_reference_over_steps(force_triton, score, shape, dtype):
    weight, grads = make_steps(shape, dtype, seed=len(shape) * 10 + SCORES.index(score))
    betas = (0.8, 0.9)  # not the defaults: the betas must be used, not assumed
    got, state = run_steps(importance, weight, grads, score, betas)
    want, state_ref = run_steps(importance_reference, weight, grads, score, betas)
    n = shape[0]
    k = shape[1] if len(shape) == 2 else 1
    for step, ((row, col), (row_ref, col_ref)) in enumerate(zip(got, want)):
        assert row.dtype == col.dtype == torch.float32
        assert row.shape == (n,) and col.shape == (k,)
        torch.testing.assert_close(row, row_ref, rtol=RTOL, atol=ATOL, msg=f"row, step {step}")
        torch.testing.assert_close(col, col_ref, rtol=RTOL, atol=ATOL, msg=f"col, step {step}")
    assert state.keys() == state_ref.keys()
    for key in state:  # PLATON's EMA and uncertainty, updated in place
        assert state[key].shape == weight.shape and state[key].abs().sum() > 0
        torch.testing.assert_close(state[key], state_ref[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
@pytest.mark.parametrize("score", SCORES)
def test_live_vectors_and_out_buffers(force_triton, score, shape):
    """Masked rows/columns count with w = 0 (as a weight multiplied by its live mask), and PLATON's
    new state goes into ``out`` with ``state`` left as it was: both paths, against the formula."""
    weight, grads = make_steps(shape, torch.float32, seed=11 + SCORES.index(score))
    n = shape[0]
    k = shape[1] if len(shape) == 2 else 1
    gen = torch.Generator().manual_seed(5)
    rows = (torch.rand(n, generator=gen) > 0.3).float().to(DEVICE)
    cols = (torch.rand(k, generator=gen) > 0.3).float().to(DEVICE) if k > 1 else None
    live = rows.view(-1, 1) * (1 if cols is None else cols.view(1, -1))
    masked_weight = (weight.view(n, k) * live).view(shape)
    for fn in (importance, importance_reference):
        state = {key: t + 0.25 for key, t in init_state(weight, score).items()}  # a non-zero start
        want_state = {key: t.clone() for key, t in state.items()}
        before = {key: t.clone() for key, t in state.items()}
        out = {key: torch.full_like(t, float("nan")) for key, t in state.items()} or None
        row, col = fn(weight, grads[0], score, state, 0.8, 0.9, rows, cols, out)
        row_ref, col_ref = importance_reference(masked_weight, grads[0], score, want_state, 0.8, 0.9)
        torch.testing.assert_close(row, row_ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(col, col_ref, rtol=RTOL, atol=ATOL)
        if score != "ema_uncertainty":  # (PLATON's state of a dead entry is zeroed by the pruner at the mask update)
            assert row[rows == 0].abs().sum() == 0
        for key in state:
            assert torch.equal(state[key], before[key])  # the old state survives (a skipped step)
            torch.testing.assert_close(out[key], want_state[key], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
def test_product_and_state_only_pass(force_triton, shape):
    """``product`` sums w·g (signs kept), against the formula, on both paths, also past a CHUNK boundary of
    the reference; PLATON with ``sums=False`` moves the state exactly as with sums and returns None."""
    weight, grads = make_steps(shape, torch.float32, seed=23)
    n = shape[0]
    k = shape[1] if len(shape) == 2 else 1
    s = (weight * grads[0]).view(n, k)
    for fn in (importance, importance_reference):
        row, col = fn(weight, grads[0], "product", {})
        torch.testing.assert_close(row, s.sum(1), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(col, s.sum(0), rtol=RTOL, atol=ATOL)
        summed, moved = init_state(weight, "ema_uncertainty"), init_state(weight, "ema_uncertainty")
        for g in grads:
            fn(weight, g, "ema_uncertainty", summed, 0.8, 0.9)
            assert fn(weight, g, "ema_uncertainty", moved, 0.8, 0.9, sums=False) is None
        for key in summed:
            assert torch.equal(summed[key], moved[key])
    with pytest.raises(ValueError, match="only moves PLATON"):
        importance_reference(weight, grads[0], "abs_product", {}, sums=False)


def test_product_blocks_add_up(monkeypatch):
    """The reference's row blocks (CHUNK elements) give the whole-tensor row sums bitwise and the column sums
    to rounding."""
    import homodistil.kernels.importance as imp

    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(37, 29, generator=gen), torch.rand(37, 29, generator=gen)
    whole = imp.importance_reference(a, b, "product", {})
    monkeypatch.setattr(imp, "CHUNK", 29 * 5)  # 5 rows a block: 8 blocks, the last ragged
    blocked = imp.importance_reference(a, b, "product", {})
    assert torch.equal(whole[0], blocked[0])
    torch.testing.assert_close(whole[1], blocked[1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(blocked[1], (a * b).sum(0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("score", SCORES)
def test_deterministic(force_triton, score):
    """Two runs from the same state are bitwise equal (no atomics in the reductions)."""
    weight, grads = make_steps((29, 37), torch.bfloat16, seed=7)
    (a, state_a), (b, state_b) = (run_steps(importance, weight, grads, score, (0.85, 0.95))
                                  for _ in range(2))
    for (row_a, col_a), (row_b, col_b) in zip(a, b):
        assert torch.equal(row_a, row_b) and torch.equal(col_a, col_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key])


def test_square_needs_no_gradient(force_triton):
    weight = torch.randn(29, 37, device=DEVICE)
    row, col = importance(weight, None, "square", {})
    torch.testing.assert_close(row, (weight**2).sum(1), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(col, (weight**2).sum(0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("score, grad, state, match", [
    ("fisher", torch.ones(3, 5), {}, "unknown element score"),
    ("abs_product", None, {}, "needs a gradient"),
    ("abs_product", torch.ones(4, 5), {}, "does not match weight"),
    ("ema_uncertainty", torch.ones(3, 5), {"ema": torch.zeros(5, 3).t(), "unc": torch.zeros(3, 5)},
     "contiguous fp32"),
    ("ema_uncertainty", torch.ones(3, 5), {"ema": torch.zeros(3, 5, dtype=torch.float64),
                                  "unc": torch.zeros(3, 5)}, "contiguous fp32"),
])
def test_rejects_bad_arguments(force_triton, score, grad, state, match):
    grad = None if grad is None else grad.to(DEVICE)
    state = {k: v.to(DEVICE) for k, v in state.items()}  # (.to keeps a transposed view's strides)
    with pytest.raises(ValueError, match=match):
        importance(torch.ones(3, 5, device=DEVICE), grad, score, state)


# PLATON's every-step CPU pass, compiled by torch.compile (inductor's C++ loop), against the reference. The two
# round differently (FMA contraction: observed ≤ 1.2e-7 of the state's scale per step; U = lerp of |I − Ī|,
# which cancels where I ≈ Ī, ≤ 3e-5 of an element but not of the scale); 1e-6 of the scale leaves a wide
# margin, and a wrong β, mask or write is O(1e-2).
COMPILED_RTOL = 1e-6


def assert_close_to_scale(got, want, what):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= COMPILED_RTOL, f"{what}: max difference {err:.2e} of the scale"


@pytest.mark.parametrize("dtype, masked", [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32-masked", "bf16"])
def test_compiled_platon_pass_matches_reference(dtype, masked):
    """Over 4 steps from a non-zero state, at an odd shape, into ``out`` buffers: the compiled pass moves Ī and U
    as the reference does, leaves ``state`` as it was (a skipped step), and in place equals it too."""
    import homodistil.kernels.importance as imp

    weight, grads = make_steps((37, 53), dtype, seed=31)
    weight, grads = weight.cpu(), [g.cpu() for g in grads]
    gen = torch.Generator().manual_seed(8)
    rows = (torch.rand(37, generator=gen) > 0.3).float() if masked else None
    cols = (torch.rand(53, generator=gen) > 0.3).float() if masked else None
    state = {k: torch.rand(37, 53, generator=gen) * 0.1 for k in ("ema", "unc")}
    ref, inplace = ({k: t.clone() for k, t in state.items()} for _ in range(2))
    for step, g in enumerate(grads):
        before = {k: t.clone() for k, t in state.items()}
        out = {k: torch.full_like(t, float("nan")) for k, t in state.items()}
        imp.importance_compiled(weight, g, state, 0.8, 0.9, rows, cols, out)
        assert all(torch.equal(state[k], before[k]) for k in state)
        imp.importance_reference(weight, g, "ema_uncertainty", ref, 0.8, 0.9, rows, cols, sums=False)
        imp.importance_compiled(weight, g, inplace, 0.8, 0.9, rows, cols)
        for k in state:
            assert_close_to_scale(out[k], ref[k], f"{k}, step {step}")
            assert_close_to_scale(inplace[k], ref[k], f"{k} in place, step {step}")
        state = out
    assert imp._compiled_step not in (None, False)  # it compiled: the figures above are the compiled loop's


def test_compiled_pass_is_chosen_per_parameter_and_partitions_bitwise(monkeypatch):
    """On CPU, PLATON's state-only pass compiles for a parameter of at least COMPILE_MIN elements, by the
    parameter's size, not the block's: fragments of any partitioning take the one path, so the state is the same
    bitwise as the whole tensor's. ``HOMODISTIL_KERNELS=torch`` keeps the reference; sums and small parameters
    stay eager."""
    import homodistil.kernels.importance as imp
    from homodistil.pruning.pruner import Fragment

    monkeypatch.delenv("HOMODISTIL_KERNELS", raising=False)
    monkeypatch.setattr(imp, "COMPILE_MIN", 37 * 53)  # the whole (37, 53) parameter, not its fragments
    compiled_calls = []
    real = imp.importance_compiled
    monkeypatch.setattr(imp, "importance_compiled", lambda *a, **k: compiled_calls.append(a[0].numel()) or real(*a, **k))
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(4))
    assert imp.compiles(w, "ema_uncertainty", False)
    assert not imp.compiles(w, "ema_uncertainty", True) and not imp.compiles(w[:5], "ema_uncertainty", False)
    assert imp.compiles(w[:5], "ema_uncertainty", False, numel=w.numel())
    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(5)) * 1e-2
    flat_w, flat_g = w.reshape(-1), g.reshape(-1)
    live = (torch.ones(37), (torch.rand(53, generator=torch.Generator().manual_seed(6)) > 0.2).float())
    results = []
    for cuts in ([0, 37 * 53], [0, 7, 980, 37 * 53]):  # whole; three fragments with partial rows
        new = {k: torch.empty(37 * 53) for k in ("ema", "unc")}
        old = {k: torch.full((37 * 53,), 0.05) for k in ("ema", "unc")}
        for lo, hi in zip(cuts, cuts[1:]):
            frag = Fragment((37, 53), lo, hi - lo, (live[0], live[1]))
            frag.sums("ema_uncertainty", flat_w[lo:hi], flat_g[lo:hi], {k: t[lo:hi] for k, t in old.items()},
                      {k: t[lo:hi] for k, t in new.items()}, betas=(0.8, 0.9), sums=False)
        results.append(new)
    assert compiled_calls and max(compiled_calls) == 37 * 53 and min(compiled_calls) < imp.COMPILE_MIN
    for k in ("ema", "unc"):
        assert torch.equal(results[0][k], results[1][k]), k
    monkeypatch.setenv("HOMODISTIL_KERNELS", "torch")
    assert not imp.compiles(w, "ema_uncertainty", False)


def test_compiled_pass_falls_back_once_where_torch_cannot_compile(monkeypatch, caplog):
    """Where compiling fails (here: a stand-in that raises as inductor does without a C++ compiler), the call
    gives the reference's state bitwise, says so once at WARNING, and later calls go straight to the reference."""
    import logging

    import homodistil.kernels.importance as imp

    def no_compiler(*args):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(details)")

    monkeypatch.delenv("HOMODISTIL_KERNELS", raising=False)
    monkeypatch.setattr(imp, "_compiled_step", None)
    monkeypatch.setattr(imp, "_build_compiled_step", lambda: no_compiler)
    monkeypatch.setattr(imp, "COMPILE_MIN", 1)
    w, g = torch.randn(9, 11), torch.randn(9, 11)
    state = {k: torch.rand(9, 11) for k in ("ema", "unc")}
    got, want = ({k: torch.empty(9, 11) for k in state} for _ in range(2))
    with caplog.at_level(logging.WARNING, logger="homodistil.kernels"):
        imp.importance(w, g, "ema_uncertainty", state, out=got, sums=False)
        imp.importance(w, g, "ema_uncertainty", state, out=got, sums=False)
    imp.importance_reference(w, g, "ema_uncertainty", state, out=want, sums=False)
    assert all(torch.equal(got[k], want[k]) for k in state)
    warned = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warned) == 1 and "CppCompileError" in warned[0] and "(details)" not in warned[0], warned
    assert imp._compiled_step is False and not imp.compiles(w, "ema_uncertainty", False)


# The interpreter never compiles: compile the kernel for an H100 (sm_90; Triton's front-end,
# LLVM and the bundled ptxas, no GPU needed) in a fresh process without TRITON_INTERPRET, at
# the tile sizes the GPU path picks for a 2-D matrix and for a bias vector.
COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from homodistil.kernels import importance as imp

fn = imp._importance_kernel
signature = dict(w_ptr="*bf16", g_ptr="*fp32", ema_ptr="*fp32", unc_ptr="*fp32",
                 ema_out_ptr="*fp32", unc_out_ptr="*fp32", rows_ptr="*fp32", cols_ptr="*fp32",
                 row_part_ptr="*fp32", col_part_ptr="*fp32", N="i32", K="i32", beta1="fp32",
                 one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32",
                 SCORE="constexpr", SUMS="constexpr", HAS_ROWS="constexpr", HAS_COLS="constexpr",
                 BLOCK_N="constexpr", BLOCK_K="constexpr")
for score in range(len(imp.SCORES)):
    for sums in (True, False) if imp.SCORES[score] == "ema_uncertainty" else (True,):
        for shape, masked in [((768, 3072), True), ((768, 3072), False), ((3072, 1), True)]:
            block_n, block_k = imp._blocks(*shape, interpreted=False)
            triton.compile(ASTSource(fn, signature, dict(SCORE=score, SUMS=sums, HAS_ROWS=masked, HAS_COLS=masked,
                                                         BLOCK_N=block_n, BLOCK_K=block_k)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
"""


def test_kernel_compiles_for_h100(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
