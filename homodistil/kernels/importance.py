"""Importance accumulation: one pass over a weight and its gradient -> row and column scores.

Element scores ``S`` (all in fp32), named by formula; which metric uses which, its state and
how it folds the sums into group scores is ``homodistil.pruning.importance``'s business:
- ``square``:          S = w²
- ``abs_product``:     S = |w · g|
- ``ema_uncertainty``: I = |w · g|;  Ī ← β1·Ī + (1−β1)·I;  U ← β2·U + (1−β2)·|I − Ī|;  S = Ī · U
                       (Zhang et al., PLATON, ICML 2022; Ī and U live in ``state``; the new values
                       are written in place, or into ``out`` so that the old ones survive a step the
                       optimizer skips)
- ``product``:         S = w · g (no absolute value: for operands that are never negative, such as
                       PLATON's Ī and U, whose S the pruner forms only where the scores are read)
Returned: ``row[i] = Σ_j S[i, j]`` and ``col[j] = Σ_i S[i, j]``. A 1-D tensor is treated as
an (n, 1) matrix, so ``row`` is its element scores. ``ema_uncertainty`` with ``sums=False`` only
moves the state and returns None: on CPU, S and its two sums are a third of the pass, and the
scores of a step the masks never read are overwritten unread.

Dead entries: ``rows`` (N,) and ``cols`` (K,) are optional fp32 live vectors (1 live, 0 masked);
an entry in a masked row or column counts with w = 0, as if it were shrunk away. They are
vectors, not a weight-sized mask: a mask update costs O(N + K) per matrix, not O(N·K).

``ema_uncertainty`` with ``out`` (the pruner's per-step path) and ``product`` allocate no weight-sized temporary
beyond a bounded block: the Triton kernel fuses everything into one pass (read w, g and the PLATON state once, write the state once) and is deterministic (each
program sums its tile into per-tile partial row and column sums, which torch then reduces in a
fixed order, no atomics); the torch reference's PLATON works in the ``out`` buffers and forms
Ī·U (and ``product``'s w·g) for its sums in blocks of at most ``CHUNK`` elements (64 MiB; its other uses
take one fp32 buffer of the weight's size, as before).

On CPU, PLATON's every-step pass (``ema_uncertainty`` with ``sums=False``) on a block of at least
``COMPILE_MIN`` elements runs compiled (:func:`importance_compiled`, ``torch.compile``): inductor's C++
backend fuses it into one loop, where the reference's six torch ops read and write sixteen
weight-sized tensors. It falls back to the reference, said once, where torch cannot compile.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from homodistil.kernels._dispatch import check_launchable, forced_backend, kernel_backend, kernel_range

SCORES = ("square", "abs_product", "ema_uncertainty", "product")  # the Triton kernel's SCORE index
# elements per row block of the reference's S = Ī·U (64 MiB of fp32): bounded, yet few blocks, since on a
# loaded CPU each op's thread hand-off costs milliseconds (1 Mi-element blocks made a 31M-element PLATON
# pass 3x slower than whole-tensor ops)
CHUNK = 1 << 24
# elements of a parameter from which PLATON's CPU pass is compiled: one fused loop is about 2x faster than the
# six torch ops on 2 cores (benchmarks/importance_cpu.py), but compiling costs seconds once per process (about
# 20 s cold, a few warm), which small models never win back. 4 Mi: a 1024 × 4096 FFN matrix and an embedding
# of hidden ≥ 138 compile; test-sized models (configs/tiny.yaml: 30,522 × 64) stay eager
COMPILE_MIN = 1 << 22
logger = logging.getLogger("homodistil.kernels")


def _matrix(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``t`` as an (n, k) view (a 1-D tensor is a column)."""
    return t.reshape(n, k)


def importance_reference(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    score: str,
    state: dict[str, torch.Tensor],
    beta1: float = 0.85,
    beta2: float = 0.95,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    out: dict[str, torch.Tensor] | None = None,
    sums: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain-torch reference. weight/grad (N, K) or (N,), any float dtype -> fp32 (N,), (K,).

    ``rows``/``cols``: fp32 live vectors (N,), (K,) or None (all live). ``out``: ``ema_uncertainty`` only,
    ``{"ema", "unc"}`` buffers shaped like the state that receive the new state (None: ``state``
    is updated in place). With ``out``, its I lives in ``out["unc"]`` until U replaces it, and
    S = Ī·U is formed in row blocks of at most ``CHUNK`` elements for its sums, as is ``product``'s S.
    Elementwise results and row sums are bitwise those of whole-tensor ops; column sums of a weight
    above ``CHUNK`` elements add per-block partials. ``sums=False`` (``ema_uncertainty`` only): the
    state moves, nothing is summed, None is returned.
    """
    _check_score(score, grad, sums)
    n = weight.shape[0]
    k = weight.shape[1] if weight.dim() == 2 else 1
    w = _matrix(weight, n, k).float()
    if score == "product":
        return _product_sums(w, _matrix(grad, n, k).float(), rows, cols)
    if score == "ema_uncertainty" and out is not None:
        ipt = _matrix(out["unc"], n, k)  # I, then U
    else:
        ipt = torch.empty((n, k), dtype=torch.float32, device=weight.device)
    if score == "square":
        torch.mul(w, w, out=ipt)
    else:
        torch.mul(w, _matrix(grad, n, k).float(), out=ipt)
    if rows is not None:  # a dead row or column counts with w = 0: (w·g)·0 = (w·0)·g
        ipt.mul_(rows.view(-1, 1))
    if cols is not None:
        ipt.mul_(cols.view(1, -1))
    if score != "ema_uncertainty":
        s = ipt if score == "square" else ipt.abs_()
        return s.sum(dim=1), s.sum(dim=0)
    ipt.abs_()  # I = |w·g|
    new = state if out is None else out
    ema0, unc0 = _matrix(state["ema"], n, k), _matrix(state["unc"], n, k)
    ema1, unc1 = _matrix(new["ema"], n, k), _matrix(new["unc"], n, k)
    torch.lerp(ema0, ipt, 1 - beta1, out=ema1)  # Ī
    ipt.sub_(ema1).abs_()  # |I − Ī|
    torch.lerp(unc0, ipt, 1 - beta2, out=unc1)  # U (into I's buffer when ``out`` is given)
    if not sums:
        return None
    if out is None:  # I's own buffer is free: S in one pass, as before
        s = torch.mul(ema1, unc1, out=ipt)
        return s.sum(dim=1), s.sum(dim=0)
    return _product_sums(ema1, unc1)


def _check_score(score: str, grad: torch.Tensor | None, sums: bool) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown element score {score!r} (known: {', '.join(SCORES)})")
    if score != "square" and grad is None:
        raise ValueError(f"score {score!r} needs a gradient")
    if not sums and score != "ema_uncertainty":
        raise ValueError(f"sums=False only moves PLATON's state; score {score!r} has none")


def _product_sums(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (N,) and column (K,) sums of S = a·b for fp32 (N, K) ``a``, ``b``, formed in row blocks of at most
    ``CHUNK`` elements (no weight-sized temporary); ``rows``/``cols``: live vectors, as for the other scores."""
    n, k = a.shape
    row_sum = torch.empty(n, dtype=torch.float32, device=a.device)
    col_sum = torch.zeros(k, dtype=torch.float32, device=a.device)
    step = max(1, CHUNK // max(k, 1))  # whole rows per block
    scratch = torch.empty(min(n, step) * k, dtype=torch.float32, device=a.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        s = torch.mul(a[lo:hi], b[lo:hi], out=scratch[:(hi - lo) * k].view(hi - lo, k))  # S, (rows, K)
        if rows is not None:
            s.mul_(rows[lo:hi].view(-1, 1))
        if cols is not None:
            s.mul_(cols.view(1, -1))
        row_sum[lo:hi] = s.sum(dim=1)
        col_sum += s.sum(dim=0)
    return row_sum, col_sum


def _platon_step(weight, grad, ema, unc, ema_out, unc_out, rows, cols, beta1: float, beta2: float) -> None:
    """PLATON's state step as one expression, the reference's formula (operands (N, K); ``rows`` (N,),
    ``cols`` (K,) live vectors or None): Ī → ``ema_out``, U → ``unc_out``, which may be ``ema``, ``unc``.
    Compiled, it is one loop over the elements with no temporary (:func:`importance_compiled`)."""
    ipt = weight.float() * grad.float()
    if rows is not None:  # a dead row or column counts with w = 0, as in the reference
        ipt = ipt * rows.view(-1, 1)
    if cols is not None:
        ipt = ipt * cols.view(1, -1)
    ipt = ipt.abs()  # I = |w·g|
    new_ema = torch.lerp(ema, ipt, 1 - beta1)
    unc_out.copy_(torch.lerp(unc, (ipt - new_ema).abs(), 1 - beta2))
    ema_out.copy_(new_ema)


_compiled_step = None  # torch.compile(_platon_step), built at the first compiled call; False: torch cannot


def _build_compiled_step():
    """The compiled step (dynamic shapes: one compilation per live-vector combination and dtype, not per
    weight shape). Inductor's cache goes to ``~/.cache/homodistil/inductor`` unless TORCHINDUCTOR_CACHE_DIR
    says otherwise: a private folder, not the shared /tmp one another user could fill first."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = Path.home() / ".cache" / "homodistil" / "inductor"
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return torch.compile(_platon_step, dynamic=True, fullgraph=True)


def compiles(weight: torch.Tensor, score: str, sums: bool, numel: int | None = None) -> bool:
    """Whether :func:`importance` takes the compiled CPU path: PLATON's state-only pass on CPU for a parameter
    of at least ``COMPILE_MIN`` elements (``numel``, default the block's: every block of a parameter, at any
    world size, takes the same path, so the state is the same bitwise however it is partitioned), no backend
    forced (``HOMODISTIL_KERNELS=torch`` keeps the reference) and torch able to compile here."""
    return (score == "ema_uncertainty" and not sums and weight.device.type == "cpu"
            and (weight.numel() if numel is None else numel) >= COMPILE_MIN and forced_backend() is None
            and _compiled_step is not False)


def importance_compiled(weight, grad, state, beta1=0.85, beta2=0.95, rows=None, cols=None, out=None) -> None:
    """PLATON's state-only pass (``ema_uncertainty``, ``sums=False``), compiled by ``torch.compile``: the
    reference's contract and formula, one fused loop on CPU. Where compiling fails (no C++ compiler, an
    unwritable cache) the reference runs, and from then on in this process: said once at WARNING."""
    global _compiled_step
    _check_score("ema_uncertainty", grad, False)
    n = weight.shape[0]
    k = weight.shape[1] if weight.dim() == 2 else 1
    if grad.numel() != weight.numel():
        raise ValueError(f"grad ({tuple(grad.shape)}) does not match weight ({tuple(weight.shape)})")
    _check_state(state, weight, "state")
    _check_state(state if out is None else out, weight, "out")
    _check_live(rows, n, weight, "rows")
    _check_live(cols, k, weight, "cols")
    new = state if out is None else out
    view = {key: _matrix(t, n, k) for key, t in (*state.items(), *(("out_" + key, t) for key, t in new.items()))}
    try:
        if _compiled_step is None:
            _compiled_step = _build_compiled_step()
            logger.info("homodistil kernels: PLATON's CPU pass is compiled (torch.compile) for blocks of >= %d "
                        "elements", COMPILE_MIN)
        _compiled_step(_matrix(weight, n, k), _matrix(grad, n, k), view["ema"], view["unc"], view["out_ema"],
                       view["out_unc"], rows, cols, beta1, beta2)
    except Exception as e:  # torch cannot compile here: the reference, which raises what is not about compiling
        _compiled_step = False
        logger.warning("homodistil kernels: torch.compile failed (%s: %s); PLATON's CPU pass runs as torch ops",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        importance_reference(weight, grad, "ema_uncertainty", state, beta1, beta2, rows, cols, out, sums=False)


@triton.jit
def _importance_kernel(
    w_ptr,  # (N, K) weight, contiguous, any float dtype
    g_ptr,  # (N, K) gradient, contiguous, any float dtype (placeholder for square)
    ema_ptr,  # (N, K) fp32 PLATON EMA Ī, read (placeholder unless ema_uncertainty)
    unc_ptr,  # (N, K) fp32 PLATON uncertainty U, read (placeholder unless ema_uncertainty)
    ema_out_ptr,  # (N, K) fp32 new Ī, written (may be ema_ptr: in place)
    unc_out_ptr,  # (N, K) fp32 new U, written (may be unc_ptr)
    rows_ptr,  # (N,) fp32 live rows, 1 or 0 (placeholder unless HAS_ROWS)
    cols_ptr,  # (K,) fp32 live columns (placeholder unless HAS_COLS)
    row_part_ptr,  # (cdiv(K, BLOCK_K), N) fp32 out: row sums of each column tile (placeholder unless SUMS)
    col_part_ptr,  # (cdiv(N, BLOCK_N), K) fp32 out: column sums of each row tile (placeholder unless SUMS)
    N, K,
    beta1, one_minus_beta1, beta2, one_minus_beta2,  # fp32; 1 − β precomputed, as torch's alpha
    SCORE: tl.constexpr,  # index into SCORES: 0 square, 1 abs_product, 2 ema_uncertainty, 3 product
    SUMS: tl.constexpr,  # write the partial sums (False: PLATON's state moves, nothing is summed)
    HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
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
    if HAS_ROWS:  # a dead row or column counts with w = 0 (as the reference: w·0)
        w = w * tl.load(rows_ptr + r, mask=r < N, other=0.0)[:, None]
    if HAS_COLS:
        w = w * tl.load(cols_ptr + c, mask=c < K, other=0.0)[None, :]
    if SCORE == 0:
        score = w * w
    else:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if SCORE == 3:
            score = w * g
        elif SCORE == 1:
            score = tl.abs(w * g)
        else:
            ipt = tl.abs(w * g)
            ema = tl.load(ema_ptr + offs, mask=ok, other=0.0) * beta1 + one_minus_beta1 * ipt
            unc = (tl.load(unc_ptr + offs, mask=ok, other=0.0) * beta2
                   + one_minus_beta2 * tl.abs(ipt - ema))
            tl.store(ema_out_ptr + offs, ema, mask=ok)
            tl.store(unc_out_ptr + offs, unc, mask=ok)
            score = ema * unc
    if SUMS:
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


def _check_state(state: dict[str, torch.Tensor], w: torch.Tensor, what: str) -> None:
    """PLATON state is read or written in place: contiguous fp32 of w's size and device, no silent copies."""
    for name in ("ema", "unc"):
        t = state[name]
        if t.dtype != torch.float32 or t.numel() != w.numel() or t.device != w.device or not t.is_contiguous():
            raise ValueError(f"{what}[{name!r}] must be a contiguous fp32 tensor of {w.numel()} elements on "
                             f"{w.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _check_live(live: torch.Tensor | None, size: int, w: torch.Tensor, what: str) -> None:
    if live is not None and (live.dtype != torch.float32 or live.shape != (size,) or live.device != w.device
                             or not live.is_contiguous()):
        raise ValueError(f"{what} must be a contiguous fp32 ({size},) tensor on {w.device}, got {live.dtype} "
                         f"{tuple(live.shape)} on {live.device}")


def importance_triton(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    score: str,
    state: dict[str, torch.Tensor],
    beta1: float = 0.85,
    beta2: float = 0.95,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    out: dict[str, torch.Tensor] | None = None,
    sums: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Triton path; same contract as :func:`importance_reference`.

    An empty weight goes to the reference (a Triton grid cannot be empty).
    """
    _check_score(score, grad, sums)
    if weight.dim() not in (1, 2) or not weight.is_floating_point():
        raise ValueError(f"weight must be a 1-D or 2-D float tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:
        return importance_reference(weight, grad, score, state, beta1, beta2, rows, cols, out, sums)
    interpreted = check_launchable(_importance_kernel, weight)
    n, k = weight.shape if weight.dim() == 2 else (weight.shape[0], 1)
    w = weight.contiguous()
    g = ema = unc = ema_out = unc_out = w  # placeholders for the operands this score does not touch
    if score != "square":
        if grad.numel() != w.numel() or grad.device != w.device or not grad.is_floating_point():
            raise ValueError(f"grad ({grad.dtype} {tuple(grad.shape)} on {grad.device}) does not "
                             f"match weight ({tuple(weight.shape)} on {weight.device})")
        g = grad.reshape(w.shape).contiguous()
    if score == "ema_uncertainty":
        _check_state(state, w, "state")
        _check_state(state if out is None else out, w, "out")
        ema, unc = state["ema"], state["unc"]
        ema_out, unc_out = (ema, unc) if out is None else (out["ema"], out["unc"])
    _check_live(rows, n, w, "rows")
    _check_live(cols, k, w, "cols")
    block_n, block_k = _blocks(n, k, interpreted)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    row_part = col_part = w  # placeholders where nothing is summed
    if sums:
        row_part = torch.empty((grid[1], n), dtype=torch.float32, device=w.device)
        col_part = torch.empty((grid[0], k), dtype=torch.float32, device=w.device)
    _importance_kernel[grid](w, g, ema, unc, ema_out, unc_out, w if rows is None else rows,
                             w if cols is None else cols, row_part, col_part, n, k,
                             beta1, 1 - beta1, beta2, 1 - beta2, SCORE=SCORES.index(score), SUMS=sums,
                             HAS_ROWS=rows is not None, HAS_COLS=cols is not None,
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8)
    return (row_part.sum(dim=0), col_part.sum(dim=0)) if sums else None


def importance(weight, grad, score, state, beta1=0.85, beta2=0.95, rows=None, cols=None, out=None, sums=True,
               numel=None):
    """Dispatching entry point: the fused Triton kernel on CUDA (or when forced); on CPU PLATON's state-only
    pass for a large parameter compiled (:func:`compiles`; ``numel``: the elements of the parameter the block
    belongs to, default the block's); else the reference."""
    with kernel_range("importance", weight):
        if kernel_backend(weight) == "torch":
            if compiles(weight, score, sums, numel):
                return importance_compiled(weight, grad, state, beta1, beta2, rows, cols, out)
            return importance_reference(weight, grad, score, state, beta1, beta2, rows, cols, out, sums)
        return importance_triton(weight, grad, score, state, beta1, beta2, rows, cols, out, sums)
