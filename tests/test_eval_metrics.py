"""Metrics against hand-computed values (homodistil.eval.metrics)."""
from __future__ import annotations

import math

import pytest

from homodistil.eval import metrics as M


def test_classification_metrics():
    preds, refs = [1, 0, 1, 1], [1, 1, 1, 0]
    assert M.accuracy(preds, refs) == 0.5
    # TP=2 FP=1 FN=1 -> P=R=2/3
    assert M.f1(preds, refs) == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (0 - 1) / sqrt(3*3*1*1)
    assert M.matthews(preds, refs) == pytest.approx(-1 / 3)
    # macro F1: class 0 -> 1, class 1 -> P=1 R=1/2, class 2 -> P=1/2 R=1
    assert M.f1([0, 1, 2, 2], [0, 1, 1, 2], average="macro") == pytest.approx(7 / 9)
    assert M.compute(["accuracy", "f1_macro"], [0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(
        {"accuracy": 0.75, "f1_macro": 7 / 9})
    assert M.matthews([1, 1, 1], [0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no predictions"):
        M.accuracy([], [])


def test_correlations():
    assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    assert M.spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
    # ranks differ by +-1 everywhere: 1 - 6*4 / (4*(16-1)) = 0.6
    assert M.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert M.pearson([2, 2, 2], [1, 2, 3]) == 0.0       # constant input: defined as 0
    assert M.spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_normalize_answer():
    assert M.normalize_answer("The  Cat's hat!") == "cats hat"
    assert M.normalize_answer("An apple, a day.") == "apple day"
    assert M.normalize_answer("theater anthem") == "theater anthem"    # articles only as words
    assert M.normalize_answer("  A  ") == ""
    assert M.normalize_answer("\tTHE\nEnd-game ") == "endgame"
    assert M.normalize_answer("the-end") == "theend"                   # punctuation goes first


def test_squad_v1():
    refs = {"1": ["Eiffel Tower"], "2": ["France", "Paris"], "3": ["1889", "in the year 1889"]}
    preds = {"1": "the Eiffel Tower", "2": "Paris, France", "3": "in 1889"}
    out = M.squad_v1(preds, refs)
    # EM: only q1. F1: q1 1; q2 max(2/3, 2/3); q3 max(2/3, P=1 R=2/3 -> 0.8)
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.8) / 3)
    # a missing prediction counts as wrong (total includes it), as in evaluate-v1.1.py
    refs["4"] = ["x"]
    assert M.squad_v1(preds, refs)["exact_match"] == pytest.approx(25.0)
    assert M.f1_score_v1("", "") == 0.0                                 # v1.1 quirk


def test_squad_v2():
    refs = {"a": ["Denver Broncos"], "b": [], "c": [], "d": ["1066", "in 1066"]}
    preds = {"a": "Broncos", "b": "", "c": "the Normans", "d": "1066"}
    out = M.squad_v2(preds, refs)
    assert out["exact"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 1) / 4)
    assert out["total"] == 4
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["HasAns_f1"] == pytest.approx(100 * 5 / 6)
    assert out["NoAns_exact"] == pytest.approx(50.0) and out["NoAns_f1"] == pytest.approx(50.0)
    assert out["HasAns_total"] == 2 and out["NoAns_total"] == 2
    assert "best_exact" not in out
    # no-answer probabilities: above the threshold the prediction becomes "no answer"
    na = {"a": 0.1, "b": 0.9, "c": 0.8, "d": 0.2}
    out = M.squad_v2(preds, refs, na_probs=na, na_prob_thresh=0.5)
    assert out["exact"] == pytest.approx(75.0)
    assert out["f1"] == pytest.approx(100 * (2 / 3 + 3) / 4)
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == pytest.approx(0.2)
    assert out["best_f1"] == pytest.approx(100 * (2 / 3 + 3) / 4) and out["best_f1_thresh"] == pytest.approx(0.2)
    # a gold answer that normalises to nothing counts as "no answer"; missing predictions skipped
    out = M.squad_v2({"x": ""}, {"x": ["The"], "y": ["z"]})
    assert out["exact"] == 100.0 and out["total"] == 1
    assert M.compute_f1("", "") == 1.0 and M.compute_f1("a b", "") == 0.0


def test_main_score():
    assert M.main_score({"accuracy": 0.8, "f1": 0.6}) == pytest.approx(70.0)
    assert M.main_score({"matthews": 0.25}) == pytest.approx(25.0)
    assert M.main_score({"pearson": 0.9, "spearman": 0.8}) == pytest.approx(85.0)
    assert M.main_score({"exact_match": 50.0, "f1": 60.0}) == 60.0
    assert M.main_score({"exact": 40.0, "f1": 45.0, "total": 3}) == 45.0
    with pytest.raises(ValueError):
        M.main_score({"bleu": 1.0})
