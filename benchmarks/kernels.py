"""Benchmark the masked linear layer and the fused importance on one CUDA GPU.

- the masked linear layer with output-row masks (what training passes) at several masked
  fractions, forward and forward+backward, at BERT-base FFN shapes, per dtype: training's
  ``F.linear × mask`` (``mask_mul``; a Triton GEMM that skipped masked rows lost to it
  everywhere and was removed, docs/gpu.md), the unmasked dense GEMM, and cuBLAS on the
  already-shrunk matrix (``shrunk``, the limit) and on the shrunk width rounded down to a
  multiple of 64 (``shrunk64``: odd widths are slow in cuBLAS).
  Goal (issue 16): ≤ 1.05× shrunk at ≤ 5% masked, ≤ 1.10× above.
- ``importance`` (fused) against the unfused torch reference, per metric and dtype (training
  feeds fp32 master weights and gradients). Goal: ≥ 3× faster; the achieved bandwidth is
  reported against the peak (a measured device-to-device copy, or ``--peak-gbs``).
- ``lm_losses`` (cross-entropy + τ²·KL over the vocabulary in one Triton pass, gradient written once in the
  logits' dtype) against the torch reference, forward+backward, at MLM (BERT, V = 30,522) and causal-LM
  (Llama-3, V = 128,256) shapes: time and the peak memory the call adds beyond its inputs. Goal (issue 26): no
  fp32 (tokens × vocabulary) copy, i.e. extra peak ≈ one gradient in the logits' dtype.

Every ratio is measured in the same run, printed as a table and written to TensorBoard
(``--logdir``). Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs,
median). Without a CUDA GPU it prints one line and exits 0.

    python benchmarks/kernels.py [--tokens 8192] [--dtype bf16 fp32] [--logdir runs/bench_kernels]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

NO_GPU = "no CUDA GPU: kernel benchmarks need one; nothing measured"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384],
                   help="GEMM rows M = batch × sequence length (default: 4096 8192 16384)")
    p.add_argument("--hidden", type=int, default=768, help="model width (default: 768)")
    p.add_argument("--ffn", type=int, default=3072, help="FFN width (default: 3072)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.25, 0.5],
                   help="fractions of output rows masked (default: 0 0.02 0.05 0.25 0.5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16"],
                   help="operand dtypes, each benchmarked in turn (default: bf16)")
    p.add_argument("--importance-shapes", nargs="+", default=["768x3072", "3072x768", "30522x768"],
                   help="weight shapes NxK for the importance benchmark")
    p.add_argument("--loss-shapes", nargs="+", default=["4096x30522", "8192x128256"],
                   help="scored rows x vocabulary MxV for the lm_losses benchmark")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="peak memory bandwidth in GB/s (default: measured with a large copy)")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--logdir", default="runs/bench_kernels", help="TensorBoard directory")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def live_mask(n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """A bool mask with round(n·(1−sparsity)) live entries at random positions (on GPU)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[: round(n * (1 - sparsity))]] = True
    return mask.cuda()


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([title, *lines])


def goal(sparsity: float) -> float:
    """Issue 16's bound on default-path / shrunk: 1.05 at ≤ 5% masked, 1.10 above."""
    return 1.05 if sparsity <= 0.05 else 1.10


def bench_masked_linear(args, dtype_name, bench, writer) -> str:
    from homodistil.pruning.masked import masked_linear

    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    # The two GEMMs of a BERT FFN: up-projection and down-projection (GELU is not part of
    # the masked layer: training applies it outside).
    layers = [("up", args.hidden, args.ffn), ("down", args.ffn, args.hidden)]
    for m in args.tokens:
        for name, k, n in layers:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(n, device="cuda", dtype=dtype)
            dy = torch.randn(m, n, device="cuda", dtype=dtype)
            for s in args.sparsity:
                mask = live_mask(n, s, gen)
                live = mask.nonzero().squeeze(1)
                live64 = live[: max(64, len(live) // 64 * 64)]
                shrunk = (x, w[live].contiguous(), b[live].contiguous(), dy[:, live].contiguous())
                shrunk64 = (x, w[live64].contiguous(), b[live64].contiguous(),
                            dy[:, live64].contiguous())
                full = (x, w, b, dy)

                cases = {"mask_mul": (lambda x, w, b: masked_linear(x, w, b, mask), full),
                         "dense": (F.linear, full), "shrunk": (F.linear, shrunk),
                         "shrunk64": (F.linear, shrunk64)}
                for mode in ("fwd", "fwd+bwd"):
                    t = {}
                    for case, (fn, (xi, wi, bi, dyi)) in cases.items():
                        if mode == "fwd":
                            t[case] = bench(lambda: fn(xi, wi, bi))
                        else:
                            leaves = [v.detach().requires_grad_() for v in (xi, wi, bi)]
                            t[case] = bench(lambda: fn(*leaves).backward(dyi), grad_to_none=leaves)
                    ratio = t["mask_mul"] / t["shrunk"]
                    rows.append([m, name, f"{k}->{n}", f"{s:.0%}", len(live), mode,
                                 *(t[c] * 1e6 for c in cases), ratio, t["shrunk"] / t["shrunk64"],
                                 f"{'ok' if ratio <= goal(s) else 'MISS'} (<={goal(s):.2f})"])
                    tag = f"masked_linear/{dtype_name}/{mode}/{name}/tokens{m}"
                    step = round(100 * s)
                    for c in cases:
                        writer.add_scalar(f"{tag}/{c}_us", t[c] * 1e6, step)
                    writer.add_scalar(f"{tag}/mask_mul_over_shrunk", ratio, step)
    header = ["tokens", "gemm", "K->N", "masked", "N live", "pass", "mask_mul us",
              "dense us", "shrunk us", "shrunk64 us", "mask_mul/shrunk", "shrunk/shrunk64", "goal"]
    title = (f"masked_linear ({dtype_name}; output-row masks; mask_mul = F.linear × mask, the default "
             "path; shrunk64 = shrunk width rounded down to a multiple of 64)")
    return table(title, header, rows)


def measured_peak_gbs(bench) -> float:
    """Device-to-device copy bandwidth of 1 GiB (read + write), a practical peak."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e9  # bench: seconds


def bench_importance(args, dtype_name, peak, bench, writer) -> str:
    from homodistil.kernels.importance import SCORES, importance_reference, importance_triton

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    for shape in args.importance_shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        g = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        for metric in SCORES:
            grad = None if metric == "square" else g
            platon = metric == "ema_uncertainty"
            t = {}
            for name, fn in (("fused", importance_triton), ("torch", importance_reference)):
                # PLATON's EMA and uncertainty, updated in place on every call
                state = {"ema": torch.zeros_like(w, dtype=torch.float32), "unc": torch.zeros_like(w, dtype=torch.float32)} if platon else {}
                t[name] = bench(lambda: fn(w, grad, metric, state))
            # Bytes the fused kernel must move: w (+ g) read, PLATON state read and written.
            moved = w.numel() * (w.element_size() + (0 if grad is None else g.element_size())
                                 + (16 if platon else 0))
            gbs = moved / t["fused"] / 1e9  # bench: seconds
            speedup = t["torch"] / t["fused"]
            rows.append([shape, metric, t["fused"] * 1e6, t["torch"] * 1e6, speedup, gbs,
                         gbs / peak, "ok" if speedup >= 3 else "MISS"])
            tag = f"importance/{dtype_name}/{metric}/{shape}"
            writer.add_scalar(f"{tag}/speedup_vs_torch", speedup, 0)
            writer.add_scalar(f"{tag}/gbs", gbs, 0)
            writer.add_scalar(f"{tag}/fraction_of_peak", gbs / peak, 0)
    header = ["shape", "metric", "fused us", "torch us", "speedup", "GB/s", "of peak", "goal>=3x"]
    return table(f"importance ({dtype_name} weights and grads; peak {peak:.0f} GB/s)",
                 header, rows)


def bench_lm_losses(args, dtype_name, bench, writer) -> str:
    from homodistil.kernels.lm_losses import LMLosses, lm_losses_reference

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    for shape in args.loss_shapes:
        m, v = (int(x) for x in shape.lower().split("x"))
        s = torch.randn(m, v, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        t = torch.randn(m, v, device="cuda", dtype=dtype, generator=gen)
        y = torch.randint(0, v, (m,), device="cuda", generator=gen)
        paths = {"fused": lambda: LMLosses.apply(s, t, y, 1.0, 1.0, 2.0)[0],
                 "torch": lambda: lm_losses_reference(s, t, y, 1.0, 1.0, 2.0)[0]}
        took, extra = {}, {}
        for name, fn in paths.items():
            took[name] = bench(lambda: fn().backward(), grad_to_none=[s])
            s.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().backward()
            torch.cuda.synchronize()
            extra[name] = (torch.cuda.max_memory_allocated() - base) / 2**20  # MiB beyond the inputs
            s.grad = None
        one_grad = m * v * s.element_size() / 2**20
        speedup = took["torch"] / took["fused"]
        rows.append([shape, took["fused"] * 1e6, took["torch"] * 1e6, speedup, extra["fused"], extra["torch"],
                     one_grad, "ok" if extra["fused"] <= 1.1 * one_grad + 1 else "MISS"])
        tag = f"lm_losses/{dtype_name}/{shape}"
        writer.add_scalar(f"{tag}/speedup_vs_torch", speedup, 0)
        writer.add_scalar(f"{tag}/fused_extra_mib", extra["fused"], 0)
        writer.add_scalar(f"{tag}/torch_extra_mib", extra["torch"], 0)
    header = ["MxV", "fused us", "torch us", "speedup", "fused MiB", "torch MiB", "1 grad MiB", "goal"]
    return table(f"lm_losses ({dtype_name} logits, fwd+bwd; MiB = peak beyond the inputs, the gradient included)",
                 header, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    import triton
    import triton.testing
    from torch.utils.tensorboard import SummaryWriter

    def bench(fn, grad_to_none=None) -> float:
        """Median seconds per call."""
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                       grad_to_none=grad_to_none, return_mode="median") / 1e3

    torch.manual_seed(args.seed)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fp32 matmuls: {torch.backends.cuda.matmul.fp32_precision}")
    writer = SummaryWriter(args.logdir)
    try:
        peak = args.peak_gbs or measured_peak_gbs(bench)
        for dtype_name in args.dtype:
            for report in (bench_masked_linear(args, dtype_name, bench, writer),
                           bench_importance(args, dtype_name, peak, bench, writer),
                           bench_lm_losses(args, dtype_name, bench, writer)):
                print("\n" + report, flush=True)
                writer.add_text("tables", "```\n" + report + "\n```")
    finally:
        writer.close()
    print(f"\nTensorBoard: {args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
