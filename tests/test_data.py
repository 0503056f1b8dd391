"""Deterministic MLM batches: the same global batch at any world size, exact mask counts."""
import torch
from transformers import AutoTokenizer

from homodistil.data.batches import BlockBatches, build_blocks, mask_tokens
from homodistil.engine.models import minilm_dir

TOK = AutoTokenizer.from_pretrained(minilm_dir())


def _data(seed=0):
    blocks = build_blocks("kjv", TOK, 32, max_documents=30)
    return BlockBatches(blocks, TOK, mlm_probability=0.15, seed=seed, heldout_fraction=0.1)


def test_blocks_are_cls_text_sep_without_padding():
    blocks = build_blocks("kjv", TOK, 32, max_documents=30)
    assert blocks.shape[1] == 32 and blocks.dtype == torch.int32
    assert (blocks[:, 0] == TOK.cls_token_id).all() and (blocks[:, -1] == TOK.sep_token_id).all()
    assert not (blocks == TOK.pad_token_id).any()
    assert TOK.decode(blocks[0, 1:8]).startswith("in the beginning god created")


def test_same_global_batch_at_world_size_1_and_2():
    data = _data()
    for step in (0, 3, 500):  # 500 steps × 8 samples wraps into a later epoch
        for micro in (0, 1):
            whole = data.batch(step, micro, grad_accum=2, micro_batch=4, rank=0, world=1)
            parts = [data.batch(step, micro, grad_accum=2, micro_batch=2, rank=r, world=2) for r in (0, 1)]
            for key in whole:
                assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), (step, micro, key)


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b, c = _data(0), _data(0), _data(1)
    kw = dict(grad_accum=1, micro_batch=4, rank=0, world=1)
    assert torch.equal(a.batch(7, 0, **kw)["input_ids"], b.batch(7, 0, **kw)["input_ids"])
    assert not torch.equal(a.batch(7, 0, **kw)["input_ids"], c.batch(7, 0, **kw)["input_ids"])
    assert not torch.equal(a.batch(7, 0, **kw)["input_ids"], a.batch(8, 0, **kw)["input_ids"])


def test_masking_count_and_labels():
    data = _data()
    block = data.train[0]
    inputs, labels = mask_tokens(block, data.info, 0.15, torch.Generator().manual_seed(0))
    scored = labels != -100
    assert int(scored.sum()) == round(0.15 * 30)  # 30 maskable tokens between [CLS] and [SEP]
    assert not scored[0] and not scored[-1]  # special tokens are never predicted
    assert torch.equal(labels[scored], block.long()[scored])
    assert torch.equal(inputs[~scored], block.long()[~scored])


def test_heldout_is_disjoint_and_fixed():
    data = _data()
    assert len(data.heldout) == round(0.1 * (len(data.train) + len(data.heldout)))
    first = [b["input_ids"] for b in data.heldout_batches(4)]
    again = [b["input_ids"] for b in data.heldout_batches(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_causal_blocks_and_next_token_labels():
    blocks = build_blocks("kjv", TOK, 32, max_documents=30, objective="causal")
    assert blocks.shape[1] == 32
    # The BERT tokenizer has no BOS/EOS: no prefix, documents joined by [SEP]
    assert TOK.decode(blocks[0, :7]).startswith("in the beginning god created")
    assert (blocks == TOK.sep_token_id).any() and not (blocks == TOK.cls_token_id).any()
    data = BlockBatches(blocks, TOK, mlm_probability=0.15, seed=0, heldout_fraction=0.1, objective="causal")
    batch = data.batch(2, 0, grad_accum=1, micro_batch=4, rank=0, world=1)
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()
    assert all(any(torch.equal(row, b.long()) for b in data.train) for row in ids)  # inputs are unmasked blocks


def test_causal_labels_skip_padding():
    from homodistil.data.batches import causal_labels

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_labels(ids, mask).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
