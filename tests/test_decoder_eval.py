"""Evaluation of a causal-LM student: perplexity and KL against a plain torch reference, greedy
continuations against ``generate(do_sample=False)``, and ``homodistil evaluate`` / ``report`` on a
tiny Llama run's export."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from homodistil.cli import main
from homodistil.data.batches import causal_labels
from homodistil.engine.models import minilm_dir
from homodistil.eval.decoder import PROMPTS, decoder_metrics, greedy_continuation


def _llama(seed: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


class _Heldout:
    """Fixed causal batches, one with a padded tail (its positions are not scored)."""

    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1000, vocab, (5, 12), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[4, 8:] = 0

    def heldout_batches(self, batch_size, limit=None):
        for s in range(0, len(self.ids), batch_size):
            ids, mask = self.ids[s:s + batch_size], self.mask[s:s + batch_size]
            yield {"input_ids": ids, "attention_mask": mask, "labels": causal_labels(ids, mask)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    dirs = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        _llama(seed, len(tokenizer)).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs, tokenizer


def test_perplexity_and_kl_equal_a_plain_torch_reference(saved):
    from transformers import AutoModelForCausalLM

    dirs, tokenizer = saved
    data = _Heldout(len(tokenizer))
    got = decoder_metrics({"student": dirs["student"]}, dirs["teacher"], data, max_blocks=5, max_new_tokens=2,
                          batch_size=2)
    batch = next(data.heldout_batches(5))
    labels = batch["labels"]
    scored = labels != -100
    logp = {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(dirs[name]).eval()
        with torch.no_grad():
            logp[name] = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                       .logits.double(), -1)[scored]
    nll = -logp["student"].gather(1, labels[scored][:, None]).mean().item()
    kl = (logp["teacher"].exp() * (logp["teacher"] - logp["student"])).sum(-1).mean().item()
    s = got["student"]
    assert s["scored_tokens"] == int(scored.sum()) == 5 * 11 - 4
    assert s["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert s["kl_to_teacher"] == pytest.approx(kl, rel=1e-4) and kl > 1e-3
    assert got["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert s["params"]["total"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(dirs["student"]).parameters())
    assert len(s["continuations"]) == len(PROMPTS) and s["latency"]["batch_size"] == 8


def test_greedy_continuation_is_generate_without_sampling(saved):
    from transformers import AutoModelForCausalLM

    dirs, tokenizer = saved
    model = AutoModelForCausalLM.from_pretrained(dirs["student"]).eval()
    model.generation_config.eos_token_id = None  # the BERT tokenizer has no EOS: neither loop stops early
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
                              pad_token_id=0)
        assert greedy_continuation(model, tokenizer, prompt, 7) == tokenizer.decode(want[0, ids.shape[1]:],
                                                                                   skip_special_tokens=True)


def test_evaluate_and_report_a_causal_run(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["distill", "defaults", *tiny(out), "model.tiny.family=llama", "pruning.sparsity.attention=0",
                 "trainer.max_steps=3", "pruning.t_f=2", "trainer.export=true", "evaluate.heldout_blocks=4"]) == 0
    assert main(["evaluate", str(out / "export")]) == 0
    results = json.loads((out / "eval" / "decoder_results.json").read_text())
    assert list(results) == ["teacher", "run"] and results["run"]["scored_tokens"] == 4 * 31
    assert abs(results["teacher"]["kl_to_teacher"]) < 1e-6 < results["run"]["kl_to_teacher"]
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "held-out perplexity" in report and PROMPTS[0] in report
    capsys.readouterr()
    loose = tmp_path / "loose" / "export"
    shutil.copytree(out / "export", loose)
    assert main(["evaluate", str(loose)]) == 2  # no run config beside it
    assert "config.yaml is missing" in capsys.readouterr().err


def test_decoder_study_pairs_seeds_and_gives_the_t_interval(tmp_path, capsys):
    """Three seeds of (a) and (b): the table's paired differences equal a hand computation (t with 2
    degrees of freedom = 4.3027), bold only where the interval excludes 0, and each export keeps its
    own name although both run directories are called seedS."""
    from pathlib import Path

    from homodistil.apps.decoder_eval import _names, main as study_main

    assert _names([Path("r/homodistil/seed0/export"), Path("r/oneshot/seed0/export")]) == [
        "homodistil/seed0", "oneshot/seed0"]
    assert _names([Path("runs/smollm2/export")]) == ["smollm2"]
    nll_a, nll_b = [3.0, 3.1, 3.2], [3.2, 3.35, 3.35]  # (a) − (b) = −0.2, −0.25, −0.15: mean −0.2, sd 0.05
    kl_a, kl_b = [0.5, 0.6, 0.7], [0.6, 0.5, 0.6]  # +−0.1 around 0: the interval spans 0

    def record(nll, kl, millions=50.0, ms=80.0):
        return {"perplexity": math.exp(nll), "nll": nll, "kl_to_teacher": kl, "scored_tokens": 10080,
                "params": {"total": int(millions * 1e6), "non_embedding": int(millions * 0.6e6)},
                "latency": {"median_ms": ms, "batch_size": 8, "seq_len": 64, "threads": 2, "repeats": 5}}

    for seed in range(3):
        for variant in ("homodistil", "oneshot"):
            (tmp_path / variant / f"seed{seed}").mkdir(parents=True)
            (tmp_path / variant / f"seed{seed}" / "wall_seconds").write_text("600\n")
        (tmp_path / "homodistil" / f"seed{seed}" / "eval").mkdir()
        (tmp_path / "homodistil" / f"seed{seed}" / "eval" / "decoder_results.json").write_text(json.dumps({
            "teacher": record(2.0, 0.0, 100.0, 150.0), f"homodistil/seed{seed}": record(nll_a[seed], kl_a[seed]),
            f"oneshot/seed{seed}": record(nll_b[seed], kl_b[seed])}))
    page = tmp_path / "page.md"
    page.write_text("# decoders\n")
    assert study_main(["--study", str(tmp_path), "--page", str(page)]) == 0
    text = page.read_text()
    half = 4.302652729911275 * 0.05 / math.sqrt(3)  # 0.124: excludes 0
    assert f"| held-out NLL (log perplexity) | **-0.200 ± {half:.3f}** | 3 |" in text
    diffs = [a - b for a, b in zip(kl_a, kl_b)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    kl_half = 4.302652729911275 * sd / math.sqrt(3)
    assert f"| KL(teacher ‖ student) | {mean:+.3f} ± {kl_half:.3f} | 3 |" in text  # not bold: spans 0
    assert "| 1 | 7.39 | 22.20 | 28.50 | 0.600 | 0.500 | 10080 | 10.0 min | 10.0 min |" in text
    assert ("Parameters (non-embedding): teacher 100.0M (60.0M), each student 50.0M (30.0M). CPU latency of a "
            "forward at batch 8 x 64 (2 threads, median of 5, seed 0's evaluation): teacher 150 ms, (a) 80 ms, "
            "(b) 80 ms.") in text
    assert study_main(["--study", str(tmp_path), "--page", str(page)]) == 0
    assert page.read_text() == text  # the block is replaced, not appended again
    assert study_main(["--study", str(tmp_path / "none")]) == 2
    assert "no evaluated pair" in capsys.readouterr().err
