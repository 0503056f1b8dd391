"""PLATON's every-step CPU pass: the compiled loop against the torch reference, side by side in one run.

    python benchmarks/importance_cpu.py                      # a 30,522 × 1024 embedding (31M elements)
    python benchmarks/importance_cpu.py --rows 1024 --cols 4096 --repeats 41

Both move PLATON's state (I = |w·g|, Ī and U; ``ema_uncertainty`` with ``sums=False`` into ``out``
buffers, as the pruner does every scored step) on the same fp32 tensors, alternating call by call so
that the machine's drift hits both alike. Prints the compile time of the first call, the median time
of each and the median of the (reference / compiled) ratios of neighbouring calls, then checks that
the two agree to a tolerance relative to the state's scale.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=30522)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=11, help="timed calls of each (after one warm-up call)")
    args = ap.parse_args()

    from homodistil.kernels.importance import importance_compiled, importance_reference

    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    weight, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 1e-3
    state = {"ema": torch.rand(shape, generator=gen) * 1e-3, "unc": torch.rand(shape, generator=gen) * 1e-4}
    outs = [{k: torch.empty_like(t) for k, t in state.items()} for _ in range(2)]

    def reference():
        importance_reference(weight, grad, "ema_uncertainty", state, 0.85, 0.95, out=outs[0], sums=False)

    def compiled():
        importance_compiled(weight, grad, state, 0.85, 0.95, out=outs[1])

    started = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - started
    reference()
    times = {"reference": [], "compiled": []}
    for _ in range(args.repeats):
        for name, fn in (("reference", reference), ("compiled", compiled)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ratio = statistics.median(a / b for a, b in zip(times["reference"], times["compiled"]))
    worst = max(((outs[0][k] - outs[1][k]).abs().max() / outs[0][k].abs().max()).item() for k in state)
    print(f"shape {args.rows} x {args.cols} ({weight.numel() / 1e6:.1f}M elements), torch threads "
          f"{torch.get_num_threads()}; first compiled call (compiling) {compile_s:.1f} s")
    print(f"reference (six torch ops) median {1e3 * statistics.median(times['reference']):.1f} ms, compiled "
          f"median {1e3 * statistics.median(times['compiled']):.1f} ms")
    print(f"reference / compiled: {ratio:.2f}   (max difference / state scale: {worst:.1e})")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
