"""Evaluation metrics, computed locally (``evaluate.load`` would fetch scripts from the hub).

GLUE-style metrics return fractions in [0, 1] (correlations in [-1, 1]), as the GLUE
``evaluate`` metric does; the SQuAD metrics return percentages, as the official scripts do.
:func:`main_score` maps a task's metrics to one number on a 0-100 scale for reports.

SQuAD follows the official evaluation scripts (v1.1 ``evaluate-v1.1.py`` and
``evaluate-v2.0.py``) line by line: answers are normalised by lower-casing, removing
punctuation, removing the articles a/an/the and collapsing whitespace; a prediction scores the
maximum over the gold answers.
"""
from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


def _arrays(predictions, references):
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape:
        raise ValueError(f"predictions {p.shape} and references {r.shape} differ in shape")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, r


def accuracy(predictions: Sequence, references: Sequence) -> float:
    p, r = _arrays(predictions, references)
    return float((p == r).mean())


def f1(predictions: Sequence, references: Sequence, average: str = "binary", pos_label=1) -> float:
    """F1 score; ``average="binary"`` (of ``pos_label``, as GLUE MRPC/QQP) or ``"macro"``."""
    from sklearn.metrics import f1_score
    p, r = _arrays(predictions, references)
    if average == "binary":
        return float(f1_score(r, p, average="binary", pos_label=pos_label, zero_division=0))
    return float(f1_score(r, p, average=average, zero_division=0))


def matthews(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation (CoLA); 0 when either side is constant."""
    from sklearn.metrics import matthews_corrcoef
    p, r = _arrays(predictions, references)
    return float(matthews_corrcoef(r, p))


def _correlation(kind, predictions, references) -> float:
    from scipy import stats
    p, r = _arrays(predictions, references)
    p, r = p.astype(float), r.astype(float)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(r) == 0:
        return 0.0          # undefined for a constant input; reported as no correlation
    value = float((stats.pearsonr if kind == "pearson" else stats.spearmanr)(p, r)[0])
    return value if math.isfinite(value) else 0.0


def pearson(predictions: Sequence, references: Sequence) -> float:
    """Pearson correlation (STS-B); 0 when either side is constant."""
    return _correlation("pearson", predictions, references)


def spearman(predictions: Sequence, references: Sequence) -> float:
    """Spearman rank correlation (STS-B); 0 when either side is constant."""
    return _correlation("spearman", predictions, references)


METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_macro": lambda p, r: f1(p, r, average="macro"),
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(metric_names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Several classification/regression metrics by name (see ``METRIC_FUNCTIONS``)."""
    return {name: METRIC_FUNCTIONS[name](predictions, references) for name in metric_names}


# --------------------------------------------------------------------------------------------
# SQuAD (official scripts)
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official rule)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score_v1(prediction: str, ground_truth: str) -> float:
    """Token F1 of the v1.1 script (0 when nothing is shared, also for empty strings)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_v1(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1: ``{"exact_match", "f1"}`` in percent, over every question in
    ``references`` (id -> gold answer texts); a missing prediction scores 0, as officially."""
    if not references:
        raise ValueError("no SQuAD references to score")
    em = f1_total = 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(float(exact_match_score(pred, g)) for g in golds)
        f1_total += max(f1_score_v1(pred, g) for g in golds)
    total = len(references)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1_total / total}


def _tokens_v2(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token F1 of the v2.0 script: if either side is empty, 1 when both are, else 0."""
    gold_toks, pred_toks = _tokens_v2(a_gold), _tokens_v2(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _best_thresh(preds, scores, na_probs, has_ans):
    num_no_ans = sum(1 for k in has_ans if not has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
             na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
    """SQuAD v2.0 as ``evaluate-v2.0.py``: ``references`` maps id -> gold texts (empty for an
    unanswerable question); a prediction of ``""`` means "no answer". ``na_probs`` (id ->
    probability of no answer, default 0) above ``na_prob_thresh`` turn a prediction into "no
    answer". Returns ``exact``, ``f1``, ``total`` and the ``HasAns_*`` / ``NoAns_*`` breakdown
    (percent), plus ``best_exact``/``best_f1`` and their thresholds when ``na_probs`` is given.
    Questions without a prediction are skipped (as the official script does)."""
    if not references:
        raise ValueError("no SQuAD references to score")
    has_ans = {qid: bool(golds) for qid, golds in references.items()}
    exact_raw, f1_raw = {}, {}
    for qid, golds in references.items():
        gold_answers = [a for a in golds if normalize_answer(a)] or [""]
        if qid not in predictions:
            continue
        pred = predictions[qid]
        exact_raw[qid] = max(compute_exact(a, pred) for a in gold_answers)
        f1_raw[qid] = max(compute_f1(a, pred) for a in gold_answers)
    if not exact_raw:
        raise ValueError("no predictions for any SQuAD question")
    probs = {k: float(v) for k, v in na_probs.items()} if na_probs is not None else {k: 0.0 for k in predictions}

    def thresholded(scores):
        return {qid: float(not has_ans[qid]) if probs.get(qid, 0.0) > na_prob_thresh else s
                for qid, s in scores.items()}

    exact, f1s = thresholded(exact_raw), thresholded(f1_raw)

    def block(ids):
        ids = [q for q in ids if q in exact]
        if not ids:
            return None
        return {"exact": 100.0 * sum(exact[q] for q in ids) / len(ids),
                "f1": 100.0 * sum(f1s[q] for q in ids) / len(ids), "total": len(ids)}

    out = block(list(exact))
    for prefix, ids in (("HasAns", [q for q in has_ans if has_ans[q]]),
                        ("NoAns", [q for q in has_ans if not has_ans[q]])):
        b = block(ids)
        if b:
            out.update({f"{prefix}_{k}": v for k, v in b.items()})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_thresh(predictions, exact_raw, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_thresh(predictions, f1_raw, probs, has_ans)
    return out


# --------------------------------------------------------------------------------------------
# one number per task
# --------------------------------------------------------------------------------------------

def main_score(metrics: Mapping[str, float]) -> float:
    """One 0-100 number from a task's metrics: the mean of the GLUE-leaderboard metrics
    present (accuracy/F1, Matthews, Pearson/Spearman; ×100) or, for SQuAD, the F1."""
    if "exact_match" in metrics or "exact" in metrics:
        return float(metrics["f1"])
    keys = [k for k in ("accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman") if k in metrics]
    if not keys:
        raise ValueError(f"no known metric in {sorted(metrics)}")
    return 100.0 * float(np.mean([metrics[k] for k in keys]))
