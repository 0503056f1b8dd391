"""Benchmark the Triton kernels of ``homodistil.kernels`` on one CUDA GPU.

- ``masked_linear`` at several structured sparsities (the same fraction of output rows and
  input columns masked) against cuBLAS (``F.linear``) on the dense matrix and on the
  already-shrunk matrix, forward and forward+backward, at BERT-base FFN shapes in bf16.
  Goal: within 10% of the shrunk dense GEMM (``masked/shrunk ≤ 1.10``).
- ``importance`` (fused) against the unfused torch reference, per metric. Goal: ≥ 3× faster;
  the achieved bandwidth is reported against the peak (a measured device-to-device copy,
  or ``--peak-gbs``).

Every ratio is measured in the same run, printed as a table and written to TensorBoard
(``--logdir``). Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs,
median). Without a CUDA GPU it prints one line and exits 0.

    python benchmarks/kernels.py [--tokens 4096 8192 16384] [--logdir runs/bench_kernels]
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
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75],
                   help="fractions of rows and of columns masked (default: 0 0.25 0.5 0.75)")
    p.add_argument("--masks", choices=["rows", "both"], default="both",
                   help="mask output rows only (what training passes) or rows and input columns")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--importance-shapes", nargs="+", default=["768x3072", "3072x768", "30522x768"],
                   help="weight shapes NxK for the importance benchmark")
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


def bench_masked_linear(args, bench, writer) -> str:
    from homodistil.kernels.masked_linear import masked_linear_triton

    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    # The two GEMMs of a BERT FFN: up-projection with GELU, down-projection without.
    layers = [("up", args.hidden, args.ffn, "gelu"), ("down", args.ffn, args.hidden, None)]
    for m in args.tokens:
        for name, k, n, act in layers:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(n, device="cuda", dtype=dtype)
            dy = torch.randn(m, n, device="cuda", dtype=dtype)
            for s in args.sparsity:
                out_mask = live_mask(n, s, gen)
                in_mask = live_mask(k, s, gen) if args.masks == "both" else None
                rows_idx = out_mask.nonzero().squeeze(1)
                cols_idx = (torch.arange(k, device="cuda") if in_mask is None
                            else in_mask.nonzero().squeeze(1))
                shrunk = (x[:, cols_idx].contiguous(), w[rows_idx][:, cols_idx].contiguous(),
                          b[rows_idx].contiguous(), dy[:, rows_idx].contiguous())

                def dense_fn(x, w, b):
                    y = F.linear(x, w, b)
                    return F.gelu(y) if act else y

                def masked_fn(x, w, b):
                    return masked_linear_triton(x, w, b, out_mask, in_mask, act)

                keep = out_mask.to(dtype)  # (N,): the cuBLAS fallback multiplies by the mask

                def mask_mul_fn(x, w, b):
                    xi = x if in_mask is None else x * in_mask.to(dtype)
                    y = F.linear(xi, w, b) * keep
                    return F.gelu(y) if act else y

                cases = {"masked": (masked_fn, (x, w, b, dy)), "dense": (dense_fn, (x, w, b, dy)),
                         "shrunk": (dense_fn, shrunk), "mask_mul": (mask_mul_fn, (x, w, b, dy))}
                for mode in ("fwd", "fwd+bwd"):
                    t = {}
                    for case, (fn, (xi, wi, bi, dyi)) in cases.items():
                        if mode == "fwd":
                            t[case] = bench(lambda: fn(xi, wi, bi))
                        else:
                            leaves = [v.detach().requires_grad_() for v in (xi, wi, bi)]
                            t[case] = bench(lambda: fn(*leaves).backward(dyi), grad_to_none=leaves)
                    flops = 2 * m * len(rows_idx) * len(cols_idx) * (1 if mode == "fwd" else 3)
                    ratio = t["masked"] / t["shrunk"]
                    tflops = flops / t["masked"] / 1e12
                    rows.append([m, name, f"{k}->{n}", f"{s:.0%}", mode, t["masked"] * 1e6,
                                 t["shrunk"] * 1e6, t["dense"] * 1e6, t["mask_mul"] * 1e6, ratio,
                                 t["mask_mul"] / t["shrunk"],
                                 t["dense"] / t["masked"], tflops,
                                 "ok" if ratio <= 1.10 else "MISS"])
                    tag = f"masked_linear/{mode}/{name}/tokens{m}"
                    step = round(100 * s)
                    writer.add_scalar(f"{tag}/masked_over_shrunk", ratio, step)
                    writer.add_scalar(f"{tag}/dense_over_masked", t["dense"] / t["masked"], step)
                    writer.add_scalar(f"{tag}/masked_tflops", tflops, step)
    header = ["tokens", "gemm", "K->N", "sparsity", "pass", "masked us", "shrunk us", "dense us",
              "mask_mul us", "masked/shrunk", "mask_mul/shrunk", "dense/masked", "TFLOP/s", "goal<=1.10"]
    title = (f"masked_linear ({args.dtype}; masked includes its per-call mask compaction; "
             "TFLOP/s counts live work only)")
    return table(title, header, rows)


def measured_peak_gbs(bench) -> float:
    """Device-to-device copy bandwidth of 1 GiB (read + write), a practical peak."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) / 1e3) / 1e9


def bench_importance(args, bench, writer) -> str:
    from homodistil.kernels.importance import (METRICS, importance_reference, importance_triton,
                                               init_state)

    dtype = DTYPES[args.dtype]
    peak = args.peak_gbs or measured_peak_gbs(bench)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    for shape in args.importance_shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        g = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
        for metric in METRICS:
            grad = None if metric == "magnitude" else g
            t = {}
            for name, fn in (("fused", importance_triton), ("torch", importance_reference)):
                state = init_state(w, metric)  # PLATON updates it in place on every call
                t[name] = bench(lambda: fn(w, grad, metric, state))
            # Bytes the fused kernel must move: w (+ g) read, PLATON state read and written.
            moved = w.numel() * (w.element_size() + (0 if grad is None else g.element_size())
                                 + (16 if metric == "platon" else 0))
            gbs = moved / (t["fused"] / 1e3) / 1e9
            speedup = t["torch"] / t["fused"]
            rows.append([shape, metric, t["fused"] * 1e6, t["torch"] * 1e6, speedup, gbs,
                         gbs / peak, "ok" if speedup >= 3 else "MISS"])
            tag = f"importance/{metric}/{shape}"
            writer.add_scalar(f"{tag}/speedup_vs_torch", speedup, 0)
            writer.add_scalar(f"{tag}/gbs", gbs, 0)
            writer.add_scalar(f"{tag}/fraction_of_peak", gbs / peak, 0)
    header = ["shape", "metric", "fused us", "torch us", "speedup", "GB/s", "of peak", "goal>=3x"]
    return table(f"importance ({args.dtype} weights and grads; peak {peak:.0f} GB/s)",
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
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    writer = SummaryWriter(args.logdir)
    try:
        for report in (bench_masked_linear(args, bench, writer),
                       bench_importance(args, bench, writer)):
            print("\n" + report)
            writer.add_text("tables", "```\n" + report + "\n```")
    finally:
        writer.close()
    print(f"\nTensorBoard: {args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
