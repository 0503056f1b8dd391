"""Host time to prepare the importance masks of a Llama-1B-shaped student, before and after issue 26.

    python benchmarks/mask_rebuild.py            # hidden 2048, FFN 8192, 16 layers, 32/8 heads, vocab 128256

Half of every FFN and hidden group is masked (attention is not pruned in the Llama family). No
weights are built: the parameter shapes come from a model on the meta device.

- before: every scored step built a boolean mask over every element of every scored parameter on
  the host (``live_fragment``, commit 81006b9, reproduced below) and copied it to the device;
- after: once per mask change, fp32 row and column vectors per parameter (``Pruner._masks_changed``
  and ``live_vectors``); a step between mask changes reuses them (no host work).
Prints the median of ``--repeats`` timings of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def live_fragment(units: dict[int, torch.Tensor], shape: tuple[int, ...], start: int, numel: int) -> torch.Tensor:
    """The per-step host mask of commit 81006b9 (bool (numel,): the live entries of a fragment)."""
    from homodistil.pruning.pruner import pieces

    out = []
    for _, row, rows, col, cols in pieces(shape, start, numel):
        live = torch.ones(rows, cols, dtype=torch.bool)
        if 0 in units:
            live &= units[0][row:row + rows].view(-1, 1)
        if 1 in units:
            live &= units[1][col:col + cols].view(1, -1)
        out.append(live.flatten())
    return torch.cat(out) if out else torch.ones(0, dtype=torch.bool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import LlamaConfig

    from homodistil.pruning.adapters import get_adapter
    from homodistil.pruning.groups import dead_entries
    from homodistil.pruning.importance import Platon
    from homodistil.pruning.pruner import Pruner, live_vectors

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         tie_word_embeddings=True)
    adapter = get_adapter("llama")
    groups = adapter.groups(config)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in adapter.build(config, config).named_parameters()}
    pruner = Pruner(groups, lambda step: adapter.kept(config, {"ffn": 0.5, "attention": 0.0, "hidden": 0.5}),
                    importance=Platon())
    gen = torch.Generator().manual_seed(0)
    masks = {g.name: torch.rand(g.size, generator=gen) < (1.0 if g.kind == "attention" else 0.5) for g in groups}
    pruner.shapes = {n: shapes[n] for n in pruner.params}
    numel = sum(torch.Size(s).numel() for s in pruner.shapes.values())

    def before() -> None:  # per scored step
        dead = dead_entries(groups, masks, pruner.params)
        for name in pruner.params:
            if name in dead:
                live_fragment(dead[name], shapes[name], 0, torch.Size(shapes[name]).numel())

    def after() -> None:  # per mask change; a step reuses the vectors
        pruner.set_masks(masks)
        for name in pruner.params:
            pruner._live(name, torch.device("cpu"))

    def seconds(fn) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    t_before, t_after = seconds(before), seconds(after)
    print(f"Llama shape: hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads, vocab {args.vocab}: {len(pruner.params)} scored parameters, {numel / 1e9:.2f}B elements; "
          f"torch threads {torch.get_num_threads()}")
    print(f"before: host mask per scored step           {t_before:8.3f} s")
    print(f"after:  live vectors per mask change        {t_after:8.4f} s   (per step between changes: 0)")
    print(f"live vectors hold {sum(sum(t.numel() for t in v if t is not None) for v in pruner.live.values())} floats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
