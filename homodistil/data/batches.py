"""Text -> fixed-length token blocks -> MLM or causal-LM batches, deterministic for any world size.

Documents are tokenized, joined with a separator and cut into blocks of ``max_seq_length``
tokens, so no batch carries padding. MLM blocks read ``[CLS] … [SEP]`` with documents joined
by ``[SEP]``; causal-LM blocks start with the tokenizer's BOS token (if it has one) and join
documents with EOS (``[SEP]`` for a tokenizer without EOS). For the causal objective the
labels are the next tokens (``labels[t] = input_ids[t+1]``), so every loss reads the same
"scored positions" (``labels != -100``) whichever the objective. Sample ``i`` of the global batch of
step ``k`` is a pure function of (seed, k, i): an epoch-seeded permutation picks the block,
and a per-sample generator picks exactly ``round(p · n)`` masked positions (BERT's 80/10/10
replacement). The same global batch therefore gives the same data at world size 1 and 2,
and the data position in a checkpoint is just the step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Protocol

import datasets
import torch

from .corpora import DataError, load_text

log = logging.getLogger(__name__)

OBJECTIVES = ("mlm", "causal")


def block_tokens(tokenizer, objective: str) -> tuple[list[int], int, list[int]]:
    """(prefix, separator, suffix) token ids of a block for ``objective``."""
    assert objective in OBJECTIVES, objective
    if objective == "mlm":
        return [tokenizer.cls_token_id], tokenizer.sep_token_id, [tokenizer.sep_token_id]
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if sep is None:
        raise DataError(f"tokenizer '{tokenizer.name_or_path}' has neither an EOS nor a SEP token to join documents")
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), sep, []


def _blocks_from_ids(docs: list[list[int]], block: int, prefix: list[int], sep_id: int,
                     suffix: list[int]) -> torch.Tensor:
    flat: list[int] = []
    for ids in docs:
        if ids:
            flat.extend(ids)
            flat.append(sep_id)
    body = block - len(prefix) - len(suffix)
    n = len(flat) // body
    if n == 0:
        raise DataError(f"the text holds {len(flat)} tokens: too few for one block of {block}")
    core = torch.tensor(flat[: n * body], dtype=torch.int32).view(n, body)
    ends = [torch.tensor(ids, dtype=torch.int32).expand(n, len(ids)) for ids in (prefix, suffix)]
    return torch.cat([ends[0], core, ends[1]], dim=1)  # (N, T)


def scored_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Host-side index of a host batch's scored positions, so that no device step has to find them
    (boolean indexing on a device waits for the device to count the positions).

    labels (B, T), -100 where nothing is predicted -> ``scored`` (M,) int64 flat positions into
    (B·T) in row-major order (the order of boolean indexing) and ``targets`` (M,) the labels there.
    """
    flat = labels.reshape(-1)
    scored = (flat != -100).nonzero().squeeze(1)  # (M,), on the host: no device involved
    return {"scored": scored, "targets": flat[scored]}


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels (B, T): ``labels[:, t] = input_ids[:, t+1]``; -100 at the last position
    and wherever the position or its next token is padding (``attention_mask`` 0)."""
    labels = torch.full_like(input_ids, -100)
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # (B, T-1)
    labels[:, :-1] = torch.where(valid, input_ids[:, 1:], -100)
    return labels


def _digest(blocks: torch.Tensor) -> str:
    return hashlib.sha1(blocks.contiguous().numpy().tobytes()).hexdigest()


def _read_cache(path: Path, max_seq_length: int) -> torch.Tensor | None:
    """The cached blocks, or None (with a log line) when the file is unreadable, truncated,
    of another shape or does not match its checksum: the caller rebuilds it."""
    try:
        saved = torch.load(path, weights_only=True)
        blocks = saved["blocks"]
        if blocks.dtype != torch.int32 or blocks.dim() != 2 or blocks.shape[1] != max_seq_length:
            problem = f"holds {blocks.dtype} {tuple(blocks.shape)}, not int32 (N, {max_seq_length})"
        elif _digest(blocks) != saved["sha1"]:
            problem = "checksum mismatch"
        else:
            return blocks
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt, never a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        problem = f"{type(err).__name__}: {first[:80]}{'…' if len(first) > 80 else ''}"
    log.warning("%s: corrupt token cache (%s): rebuilding it", path, problem)
    return None


def build_blocks(source, tokenizer, max_seq_length: int, text_field: str = "text",
                 max_documents: int | None = None, cache_dir: str | Path | None = None,
                 objective: str = "mlm", revisions: dict[str, str] | None = None) -> torch.Tensor:
    """All blocks of ``source`` as an int32 tensor (N, T), cached under ``cache_dir`` with a
    checksum (a damaged cache is detected, logged and rebuilt); ``revisions``: ``data.revision``."""
    prefix, sep, suffix = block_tokens(tokenizer, objective)
    # optional parts join the key only when set, so that existing caches stay valid
    key = json.dumps([source, tokenizer.name_or_path, len(tokenizer), max_seq_length, text_field, max_documents]
                     + ([objective] if objective != "mlm" else []) + ([revisions] if revisions else []))
    cache = Path(cache_dir) / f"blocks-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        blocks = _read_cache(cache, max_seq_length)
        if blocks is not None:
            return blocks
    sources = source if isinstance(source, list) else [source]
    docs: list[list[int]] = []
    for src in sources:
        ds = load_text(src, text_field, max_documents, revisions=revisions)
        # Whole documents are tokenized on purpose (they are cut into blocks below), so the
        # tokenizer's "sequence longer than the model" warning does not apply.
        ds = ds.map(lambda b: {"ids": tokenizer(b["text"], add_special_tokens=False, verbose=False)["input_ids"]},
                    batched=True, remove_columns=["text"], desc=f"tokenizing {src}")
        docs.extend(ds["ids"])
    try:
        blocks = _blocks_from_ids(docs, max_seq_length, prefix, sep, suffix)
    except DataError as err:
        raise DataError(f"data.source {source!r}: {err}") from None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # runs sharing a cache may build it at once
        torch.save({"blocks": blocks, "sha1": _digest(blocks)}, tmp)
        tmp.replace(cache)
    return blocks


def _generator(*key: int) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha1(repr(key).encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def mask_tokens(ids: torch.Tensor, tokenizer_info: dict, p: float, gen: torch.Generator):
    """BERT masking of one block ``ids`` (T,): exactly round(p·n) of the n maskable positions.

    Returns ``(input_ids, labels)``; labels are -100 where no prediction is asked.
    """
    ids = ids.long()
    maskable = torch.ones_like(ids, dtype=torch.bool)
    for special in tokenizer_info["special_ids"]:
        maskable &= ids != special
    cand = maskable.nonzero().squeeze(1)
    k = max(1, int(round(p * cand.numel())))
    chosen = cand[torch.randperm(cand.numel(), generator=gen)[:k]]
    labels = torch.full_like(ids, -100)
    labels[chosen] = ids[chosen]
    inputs = ids.clone()
    action = torch.rand(k, generator=gen)
    random_tokens = torch.randint(tokenizer_info["vocab_size"], (k,), generator=gen)
    inputs[chosen] = torch.where(action < 0.8, torch.full_like(chosen, tokenizer_info["mask_id"]),
                                 torch.where(action < 0.9, random_tokens, ids[chosen]))
    return inputs, labels


def _make_sample(block: torch.Tensor, objective: str, info: dict, p: float, gen_key: tuple) -> tuple:
    """(input_ids, labels) of one block (T,): BERT-masked for MLM, the block itself for causal LM
    (whose next-token labels are made per batch by :func:`causal_labels`)."""
    if objective == "causal":
        return block.long(), None
    return mask_tokens(block, info, p, _generator(*gen_key))


def _collate(samples: list[tuple]) -> dict[str, torch.Tensor]:
    inputs, labels = zip(*samples)
    input_ids = torch.stack(inputs)  # (B, T)
    attention_mask = torch.ones_like(input_ids)  # packed blocks: no padding
    labels = causal_labels(input_ids, attention_mask) if labels[0] is None else torch.stack(labels)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class BatchSource(Protocol):
    """What training and evaluation read, from pre-built blocks (:class:`BlockBatches`) or a
    stream (:class:`StreamBatches`); :func:`from_config` builds the one a config asks for."""

    prebuilt: bool  # True: batches are a pure function of (seed, step, index), at any world size
    heldout: torch.Tensor  # (H, T) held-out blocks, never trained on

    def describe(self) -> str: ...

    def batch(self, step: int, micro: int, *, grad_accum: int, micro_batch: int, rank: int,
              world: int) -> dict[str, torch.Tensor]: ...

    def heldout_batches(self, batch_size: int, limit: int | None = None): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _HeldoutBlocks:
    """Fixed held-out batches, shared by both batch sources: ``self.heldout`` (H, T) blocks,
    masked by (seed, sample index) only, so every evaluation of a run sees the same ones."""

    heldout: torch.Tensor

    def _make(self, blocks: torch.Tensor, samples: list[tuple[int, int]], tag: int) -> dict[str, torch.Tensor]:
        return _collate([_make_sample(blocks[i], self.objective, self.info, self.p, (self.seed, tag, e, i))
                         for e, i in samples])

    def heldout_batches(self, batch_size: int, limit: int | None = None):
        """Fixed, identically masked held-out batches (for KL and MLM loss on unseen text)."""
        n = len(self.heldout) if limit is None else min(limit, len(self.heldout))
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            yield self._make(self.heldout, [(0, i) for i in idx], tag=1)


class BlockBatches(_HeldoutBlocks):
    """Deterministic MLM (or causal-LM) batches over pre-built blocks, split into train and held-out parts."""

    prebuilt = True

    def __init__(self, blocks: torch.Tensor, tokenizer, *, mlm_probability: float, seed: int,
                 heldout_fraction: float = 0.0, objective: str = "mlm"):
        n_held = int(round(len(blocks) * heldout_fraction))
        if heldout_fraction > 0:
            n_held = max(1, n_held)
        if len(blocks) - n_held < 1:
            raise DataError(f"only {len(blocks)} blocks of text: nothing left to train on after the held-out split")
        self.train, self.heldout = blocks[: len(blocks) - n_held], blocks[len(blocks) - n_held:]
        self.p, self.seed, self.objective = mlm_probability, seed, objective
        self.info = {"special_ids": sorted(set(tokenizer.all_special_ids)), "mask_id": tokenizer.mask_token_id,
                     "vocab_size": len(tokenizer)}
        self._perm_epoch, self._perm = -1, None

    def describe(self) -> str:
        return f"{len(self.train)} training blocks, {len(self.heldout)} held out"

    def state_dict(self) -> dict:
        return {}  # the position is the step: batches are a pure function of it

    def load_state_dict(self, state: dict) -> None:
        pass

    def _block_index(self, sample: int) -> tuple[int, int]:
        epoch, pos = divmod(sample, len(self.train))
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(len(self.train), generator=_generator(self.seed, epoch))
            self._perm_epoch = epoch
        return epoch, int(self._perm[pos])

    def batch(self, step: int, micro: int, *, grad_accum: int, micro_batch: int, rank: int, world: int):
        """Rank ``rank``'s part of micro-batch ``micro`` of optimizer step ``step``."""
        global_micro = micro_batch * world
        start = (step * grad_accum + micro) * global_micro + rank * micro_batch
        return self._make(self.train, [self._block_index(s) for s in range(start, start + micro_batch)], tag=0)


def check_global_batch(data, global_batch: int, cfg) -> None:
    """Pre-built blocks must fill one global batch: else a one-line error before any model work.

    ``cfg``: the data config (``source``, ``max_seq_length``) for the message.
    """
    if data.prebuilt and len(data.train) < global_batch:
        raise DataError(f"data.source {cfg.source!r}: {len(data.train)} training blocks of {cfg.max_seq_length} "
                        f"tokens, fewer than one global batch ({global_batch}): add text, or lower "
                        f"data.max_seq_length or the batch size")


class StreamBatches(_HeldoutBlocks):
    """MLM batches packed on the fly from a document stream (Wikipedia/BookCorpus scale).

    Held out first: the documents at the head of the stream that pack into ``heldout_blocks``
    blocks (the same on every rank, at any world size) are never trained on. Rank ``r`` of ``w``
    then reads the following documents ``r, r+w, …`` (``datasets.distributed.split_dataset_by_node``)
    and packs its own blocks, so no rank tokenizes what another rank trains on. The data
    position is per rank — documents consumed plus the unfinished token buffer — and is
    saved with each checkpoint, so a resumed run continues the stream where it stopped
    (at the same world size: which documents a rank reads depends on the world size, so the
    training batches do too, unlike pre-built blocks). Masking is keyed on (seed, rank, sample),
    as reproducible as the stream's order.
    """

    prebuilt = False

    def __init__(self, dataset, tokenizer, *, max_seq_length: int, mlm_probability: float, seed: int,
                 rank: int, world: int, objective: str = "mlm", heldout_blocks: int = 0):
        from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.to_iterable_dataset()
        self.tokenizer, self.block, self.p, self.seed, self.rank = tokenizer, max_seq_length, mlm_probability, seed, rank
        self.objective = objective
        self.prefix, self.sep, self.suffix = block_tokens(tokenizer, objective)
        self.info = {"special_ids": sorted(set(tokenizer.all_special_ids)), "mask_id": tokenizer.mask_token_id,
                     "vocab_size": len(tokenizer)}
        self.heldout, held_docs = self._pack_head(dataset, heldout_blocks)  # (H, T), identical on every rank
        self.dataset = split_dataset_by_node(dataset.skip(held_docs), rank=rank, world_size=world)
        self.docs, self.buffer, self.samples = 0, [], 0
        self._iter = None

    def describe(self) -> str:
        return f"streaming, rank {self.rank} at document {self.docs}, {len(self.heldout)} blocks held out"

    def _pack(self, buffer: list[int], texts) -> tuple[torch.Tensor | None, int]:
        """One block (T,) from ``buffer`` topped up from the iterator ``texts`` (None when it ends
        first), and the number of documents read. ``buffer`` keeps the remainder."""
        body, docs = self.block - len(self.prefix) - len(self.suffix), 0
        while len(buffer) < body:
            try:
                text = next(texts)["text"]
            except StopIteration:
                return None, docs
            docs += 1
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if ids:
                buffer.extend(ids + [self.sep])
        core = buffer[:body]
        del buffer[:body]
        return torch.tensor([*self.prefix, *core, *self.suffix], dtype=torch.int32), docs

    def _pack_head(self, dataset, n: int) -> tuple[torch.Tensor, int]:
        """The first ``n`` blocks of the whole stream (H, T) and how many documents they used."""
        blocks, buffer, used, texts = [], [], 0, iter(dataset)
        while len(blocks) < n:
            block, docs = self._pack(buffer, texts)
            used += docs
            if block is None:
                raise DataError(f"the text stream ended after {used} documents, before "
                                f"evaluate.heldout_blocks={n} held-out blocks: lower it or add data")
            blocks.append(block)
        return torch.stack(blocks) if blocks else torch.empty(0, self.block, dtype=torch.int32), used

    def _next_block(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = iter(self.dataset.skip(self.docs))
        block, docs = self._pack(self.buffer, self._iter)
        self.docs += docs
        if block is None:
            raise DataError(f"the text stream ended after {self.docs} documents on rank {self.rank}: "
                            f"lower trainer.max_steps or add data")
        return block

    def batch(self, step: int, micro: int, *, grad_accum: int, micro_batch: int, rank: int, world: int):
        samples = []
        for _ in range(micro_batch):
            samples.append(_make_sample(self._next_block(), self.objective, self.info, self.p,
                                        (self.seed, 2, self.rank, self.samples)))
            self.samples += 1
        return _collate(samples)

    def state_dict(self) -> dict:
        return {"docs": self.docs, "buffer": list(self.buffer), "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.docs, self.buffer, self.samples = state["docs"], list(state["buffer"]), state["samples"]
        self._iter = None


def from_config(d, tokenizer, *, seed: int, objective: str = "mlm", rank: int = 0, world: int = 1,
                cache_dir: Path | None = None, heldout_blocks: int = 0) -> BatchSource:
    """The batch source a data config (``config.DataConfig``) describes: a stream (rank ``rank``
    of ``world``; ``heldout_blocks`` held out at its head when ``d.heldout_fraction > 0``), or
    pre-built blocks (tokenized once into ``cache_dir``) split into training and held-out parts.
    The one place data is set up: training, the demo's evaluation and ``compare`` call it."""
    if d.streaming:
        text = load_text(d.source, d.text_field, d.max_documents, streaming=True, revisions=d.revision)
        return StreamBatches(text, tokenizer,
                         max_seq_length=d.max_seq_length, mlm_probability=d.mlm_probability, seed=seed,
                         rank=rank, world=world, objective=objective,
                         heldout_blocks=heldout_blocks if d.heldout_fraction > 0 else 0)
    blocks = build_blocks(d.source, tokenizer, d.max_seq_length, d.text_field, d.max_documents, cache_dir, objective,
                          d.revision)
    return BlockBatches(blocks, tokenizer, mlm_probability=d.mlm_probability, seed=seed,
                      heldout_fraction=d.heldout_fraction, objective=objective)
