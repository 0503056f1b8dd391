"""Chunked against whole-tensor shrink pieces (the driver of test_shrink_chunks.py).

For each DeepSpeed config of ``SPECS`` (a JSON list of {"stage": s, "bf16": b}), in one process:
builds a small engine (an embedding (101, 15) and an FFN 15 -> 37 -> 15 with biases; odd sizes, so
ZeRO-3 pads and ZeRO-1/2 fragments start and end inside rows), takes two AdamW steps, then streams
the pieces of a cut that keeps some rows and some columns of every weight (one width of 1) twice:
with every parameter read whole, and with ``zero.CHUNK_BYTES`` at 400 bytes, so every weight is read
in chunks of 2 to 6 rows. The reference is this rank's piece of ``shrink_tensors``' cut of the full
gathered tensors. Records, per config: whether every piece of both streams is bit-equal to the
reference, and how many pieces were read in chunks. A ``{"memory": stage}`` spec records instead
the peak resident memory of streaming a 64 MiB embedding whole and in 4 MiB chunks (:func:`memory`).

Run as ``python tests/chunked_shrink_runs.py SPECS OUT`` under torchrun; rank 0 writes the records
to ``OUT`` with ``torch.save``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

HIDDEN, FFN, VOCAB = 15, 37, 101


class Net(nn.Module):
    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, ffn: int = FFN):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)  # weight (vocab, hidden)
        self.up = nn.Linear(hidden, ffn)  # weight (ffn, hidden)
        self.down = nn.Linear(ffn, hidden)  # weight (hidden, ffn)

    def forward(self, ids):  # (B, T) -> scalar
        return self.down(torch.relu(self.up(self.emb(ids)))).pow(2).mean()


def _groups(hidden: int = HIDDEN, ffn: int = FFN):
    from homodistil.pruning.groups import Group, Slice

    return [
        Group("hidden", "hidden", hidden, (Slice("emb.weight", 1), Slice("up.weight", 1), Slice("down.weight", 0),
                                           Slice("down.bias", 0)), ()),
        Group("ffn", "ffn", ffn, (Slice("up.weight", 0), Slice("up.bias", 0), Slice("down.weight", 1)), ()),
    ]


def _engine(stage: int, bf16: bool, model: nn.Module | None = None):
    import deepspeed

    torch.manual_seed(0)  # the same initial weights on every rank
    model = model or Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "steps_per_print": 2**31}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1 + torch.distributed.get_rank())  # different batches per rank
    for _ in range(2):
        engine.backward(engine(torch.randint(0, VOCAB, (4, 6), generator=generator)))
        engine.step()
    return engine


def record(stage: int, bf16: bool) -> dict:
    from homodistil.engine import zero
    from homodistil.pruning.groups import shrink_tensors

    engine = _engine(stage, bf16)
    groups, keep = _groups(), {"hidden": torch.tensor([0, 3, 4, 9, 14]), "ffn": torch.tensor([5])}  # ascending
    params, moments, _ = zero.gather(engine)
    cut = shrink_tensors(params, groups, keep)
    cut_moments = {k: shrink_tensors({n: m[k] for n, m in moments.items()}, groups, keep) for k in zero.MOMENTS}
    reference = {n: zero.own_pieces({"param": cut[n], **{k: cut_moments[k][n] for k in zero.MOMENTS}}) for n in cut}

    chunked = 0
    original = zero.chunked_piece

    def counted(*args):
        nonlocal chunked
        chunked += 1
        return original(*args)

    zero.chunked_piece = counted
    try:
        whole, _ = zero.stream_pieces(engine, groups, keep)
        assert chunked == 0, "the default threshold chunked this small model"
        zero.CHUNK_BYTES = 400  # 100 fp32 per chunk: the embedding in 17 chunks of 6 rows, down in 8 of 2
        streamed, _ = zero.stream_pieces(engine, groups, keep)
    finally:
        zero.chunked_piece, zero.CHUNK_BYTES = original, zero.SHRINK_CHUNK_BYTES
        engine.destroy()
        zero.restore_torch_linear()

    def bit_equal(pieces) -> bool:
        return all(torch.equal(pieces[n][k].view(torch.int32), reference[n][k].view(torch.int32))
                   for n in reference for k in zero.STATE)

    return {"stage": stage, "bf16": bf16, "whole": bit_equal(whole), "chunked": bit_equal(streamed),
            "chunked_pieces": chunked, "nonzero_moments": all(bool(m["exp_avg"].any()) for m in moments.values())}


def memory(stage: int) -> dict:
    """Peak resident bytes above the start of ``stream_pieces``, read whole and in 4 MiB chunks: a
    (65536, 256) embedding (64 MiB in fp32, the largest parameter) cut to 64 of its 256 columns."""
    from homodistil.engine import hostmem, zero

    vocab, hidden = 65536, 256
    engine = _engine(stage, False, Net(vocab, hidden, 8))
    groups, keep = _groups(hidden, 8), {"hidden": torch.arange(0, hidden, 4), "ffn": torch.arange(8)}
    peaks = {}
    try:
        for how, chunk in (("whole", zero.SHRINK_CHUNK_BYTES), ("chunked", 4 * 2**20)):
            zero.CHUNK_BYTES = chunk
            base = hostmem.start_peak()
            pieces, _ = zero.stream_pieces(engine, groups, keep)
            peaks[how] = hostmem.peak_since(base)
            del pieces
    finally:
        zero.CHUNK_BYTES = zero.SHRINK_CHUNK_BYTES
        engine.destroy()
        zero.restore_torch_linear()
    width = hidden // 4
    kept = vocab * width + (8 * width + 8) + (width * 8 + width)  # the embedding, up and down with their biases
    return {"stage": stage, "memory": peaks, "share": 12 * kept / torch.distributed.get_world_size()}


def main(specs: str, out: str) -> None:
    from homodistil.engine.dist import init_distributed

    init_distributed()
    records = [memory(s["memory"]) if "memory" in s else record(s["stage"], s["bf16"])
               for s in json.loads(Path(specs).read_text())]
    if torch.distributed.get_rank() == 0:
        torch.save(records, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
