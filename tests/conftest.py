"""Test-session set-up: CPU DeepSpeed, Triton's interpreter, tiny runs of the recipe."""
from __future__ import annotations

import os

# Before anything imports triton or deepspeed: kernels run in Triton's CPU interpreter,
# DeepSpeed uses its CPU accelerator (gloo), and the hub is never contacted.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY = [
    "model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
    "model.tiny.intermediate_size=64", "model.dropout=0.0",
    "data.source=kjv", "data.max_documents=60", "data.max_seq_length=32", "data.heldout_fraction=0.05",
    "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=1",
    "trainer.progress=false", "trainer.log_every=1000", "trainer.export=false",
    "pruning.metric=platon", "pruning.t_i=0", "pruning.mask_interval=1",
    # the FFN (64) in multiples of 4 (pruning.width_multiple): at the default 64 it would be one step, 64 -> 32, and
    # the runs that resume or shrink between mask updates would have no live mask; a real FFN (3072) moves in 64s
    "pruning.width_multiple.ffn=4",
    "optimizer.lr=1e-3", "optimizer.warmup_steps=0",
]


def tiny_overrides(out_dir, **kw) -> list[str]:
    """Overrides for a tiny CPU run in ``out_dir``; ``kw`` adds ``a__b=v`` as ``a.b=v``."""
    extra = [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return TINY + [f"trainer.output_dir={out_dir}"] + extra


def assert_close_at_scale(actual, expected, rtol: float, scale: float = 1e-6, msg: str = "", of=None) -> None:
    """``assert_close`` with an absolute tolerance relative to the tensor's own scale.

    Sums taken in another order (world size 1 vs 2, a shrunk vs a masked tensor, another CPU's
    vector width) differ in the last bits of every entry; entries far below the tensor's largest
    one then differ by far more than ``rtol`` of themselves (an AVX-512 Xeon gave 3e-4 relative
    at 1e-7 in a tensor whose largest entry is ~1e-3). ``atol = scale * max|of|`` accepts that
    rounding and nothing that matters at that scale. ``of`` (default ``expected``) names the
    quantity whose scale counts: a key bias's gradient is zero in exact arithmetic (softmax ignores
    a constant shift), so its importance is rounding noise, judged at the scale of the whole
    model's importance, not at its own.
    """
    import torch  # noqa: PLC0415

    ref = expected if of is None else of
    atol = scale * float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{msg}: {m} (atol {atol:.3g} = {scale:g} x scale)" if msg else m)


@pytest.fixture
def tiny():
    return tiny_overrides


@pytest.fixture(autouse=True)
def _torch_linear_restored():
    """A ZeRO-3 engine patches F.linear process-wide; a test that fails before Recipe.close()
    must not hand the patch to the tests after it."""
    yield
    from homodistil.engine.zero import restore_torch_linear

    restore_torch_linear()
