"""Fine-tune an exported Hugging Face model directory on a task and score it.

A plain torch loop (AdamW, linear warm-up/decay, gradient clipping), seeded, with tqdm
progress, CPU-friendly defaults. Sequence classification / regression through
``AutoModelForSequenceClassification``; SQuAD through ``AutoModelForQuestionAnswering`` with
the usual sliding-window features and n-best span decoding (v2.0: "no answer" when the
null score beats the best span). The model directory is read only, never written.
"""
from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from homodistil.eval import metrics as M
from homodistil.eval.tasks import TaskData


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # SQuAD
    qa_max_length: int = 384
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence "some weights were newly initialised" chatter while a head is created."""
    from transformers.utils import logging as hf_logging
    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: str):
    """The model's tokenizer, with a padding token: decoder tokenizers (GPT-2, Llama) ship
    without one, and batches of unequal lengths need one; EOS serves (masked out anyway)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _seed_all(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tqdm(iterable, cfg: FinetuneConfig, **kw):
    if not cfg.progress:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kw)


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)
    return opt, sched


def _train_epochs(model, n_train: int, batches_fn: Callable[[torch.Generator], Iterator[dict]],
                  cfg: FinetuneConfig, evaluate_fn: Callable[[], dict], desc: str) -> list[dict]:
    """Shared loop: ``batches_fn(gen)`` yields one epoch of collated batches (with the loss
    targets), ``evaluate_fn()`` scores the model; returns the per-epoch history."""
    if n_train == 0:
        raise ValueError(f"{desc}: no training examples")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    opt, sched = _optimizer(model, cfg, max(1, steps_per_epoch * cfg.epochs))
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for batch in _tqdm(batches_fn(gen), cfg, total=steps_per_epoch,
                           desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}"):
            batch = {k: v.to(cfg.device) for k, v in batch.items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite training loss at epoch {epoch + 1}")
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        scores = evaluate_fn()
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan,
                        "train_seconds": time.perf_counter() - t0, **scores})
    return history


# --------------------------------------------------------------------------------------------
# sequence classification / regression
# --------------------------------------------------------------------------------------------

def _encode_pairs(tokenizer, ds, max_length: int) -> list[dict]:
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def _collate(tokenizer, features: list[dict], labels=None, label_dtype=torch.long) -> dict:
    batch = tokenizer.pad(features, return_tensors="pt")
    batch = {k: v for k, v in batch.items()}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=label_dtype)
    return batch


@torch.inference_mode()
def _predict_classification(model, tokenizer, feats, cfg: FinetuneConfig, regression: bool) -> np.ndarray:
    model.eval()
    order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")   # less padding
    out = np.empty(len(feats), dtype=np.float64 if regression else np.int64)
    for s in range(0, len(feats), cfg.eval_batch_size):
        idx = order[s:s + cfg.eval_batch_size]
        batch = {k: v.to(cfg.device) for k, v in _collate(tokenizer, [feats[i] for i in idx]).items()}
        logits = model(**batch).logits.float().cpu()
        out[idx] = logits[:, 0].numpy() if regression else logits.argmax(-1).numpy()
    return out


def finetune_classification(model_dir: str, task: TaskData, cfg: FinetuneConfig | None = None) -> dict:
    """Fine-tune ``model_dir`` on a classification/regression task; returns
    ``{"metrics": {split: {...}}, "main": float (0-100, first eval split), "history": [...],
    "train_examples", "eval_examples", "seconds"}``. Scores are those after the last epoch."""
    from transformers import AutoModelForSequenceClassification
    cfg = cfg or FinetuneConfig()
    spec = task.spec
    regression = spec.kind == "regression"
    t_start = time.perf_counter()
    _seed_all(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1 if regression else spec.num_labels,
            problem_type="regression" if regression else "single_label_classification",
            ignore_mismatched_sizes=True, pad_token_id=tokenizer.pad_token_id).to(cfg.device)
    if not regression and spec.label_names:
        model.config.id2label = dict(enumerate(spec.label_names))
        model.config.label2id = {n: i for i, n in enumerate(spec.label_names)}
    train_feats = _encode_pairs(tokenizer, task.train, cfg.max_length)
    train_labels = list(task.train["label"])
    eval_feats = {k: _encode_pairs(tokenizer, v, cfg.max_length) for k, v in task.evals.items()}
    label_dtype = torch.float32 if regression else torch.long

    def batches(gen):
        perm = torch.randperm(len(train_feats), generator=gen).tolist()
        for s in range(0, len(perm), cfg.batch_size):
            yield _collate(tokenizer, [train_feats[i] for i in perm[s:s + cfg.batch_size]],
                           [train_labels[i] for i in perm[s:s + cfg.batch_size]], label_dtype)

    def evaluate():
        out = {}
        for split, feats in eval_feats.items():
            preds = _predict_classification(model, tokenizer, feats, cfg, regression)
            out[split] = M.compute(spec.metrics, preds, np.asarray(task.evals[split]["label"]))
        return {"metrics": out}

    history = _train_epochs(model, len(train_feats), batches, cfg, evaluate, spec.name)
    final = history[-1]["metrics"]
    return {"metrics": final, "main": M.main_score(final[spec.eval_splits[0]]), "history": history,
            "train_examples": len(train_feats), "eval_examples": {k: len(v) for k, v in eval_feats.items()},
            "seconds": time.perf_counter() - t_start}


# --------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------

def _qa_tokenize(tokenizer, ds, cfg: FinetuneConfig):
    pad_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in ds["question"]]
    contexts = list(ds["context"])
    return tokenizer(questions if pad_right else contexts, contexts if pad_right else questions,
                     truncation="only_second" if pad_right else "only_first", max_length=cfg.qa_max_length,
                     stride=cfg.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def qa_train_features(tokenizer, ds, cfg: FinetuneConfig) -> list[dict]:
    """Sliding-window features with ``start_positions``/``end_positions`` (CLS = 0 when the
    answer is not inside the window, or the question has none)."""
    enc = _qa_tokenize(tokenizer, ds, cfg)
    context_index = 1 if tokenizer.padding_side == "right" else 0
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        sample = enc["overflow_to_sample_mapping"][i]
        answers = ds[sample]["answers"]
        seq_ids = enc.sequence_ids(i)
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in enc["input_ids"][i] else 0
        start_pos = end_pos = cls
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ctx = [j for j, s in enumerate(seq_ids) if s == context_index]
            if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
                ts = ctx[0]
                while ts <= ctx[-1] and offsets[ts][0] <= start_char:
                    ts += 1
                te = ctx[-1]
                while te >= ctx[0] and offsets[te][1] >= end_char:
                    te -= 1
                start_pos, end_pos = ts - 1, te + 1
        f = {k: enc[k][i] for k in keys}
        f["start_positions"], f["end_positions"] = start_pos, end_pos
        feats.append(f)
    return feats


def qa_eval_features(tokenizer, ds, cfg: FinetuneConfig) -> tuple[list[dict], list[int], list[list]]:
    """Features, their example index, and offsets (``None`` outside the context)."""
    enc = _qa_tokenize(tokenizer, ds, cfg)
    context_index = 1 if tokenizer.padding_side == "right" else 0
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats, example_of, offsets = [], [], []
    for i, offs in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(i)
        feats.append({k: enc[k][i] for k in keys})
        example_of.append(enc["overflow_to_sample_mapping"][i])
        offsets.append([o if seq_ids[j] == context_index else None for j, o in enumerate(offs)])
    return feats, example_of, offsets


def qa_decode(ds, example_of, offsets, start_logits, end_logits, cfg: FinetuneConfig,
              version_2: bool) -> tuple[dict[str, str], dict[str, float]]:
    """n-best span search per example over all its windows. Returns predictions (id ->
    text, ``""`` = no answer under v2.0) and the null-minus-best score margin per id."""
    per_example = collections.defaultdict(list)
    for f, ex in enumerate(example_of):
        per_example[ex].append(f)
    preds, margins = {}, {}
    for ex, fids in per_example.items():
        context = ds[ex]["context"]
        best_text, best_score, null_score = "", -math.inf, math.inf
        for f in fids:
            s_log, e_log, offs = start_logits[f], end_logits[f], offsets[f]
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            starts = np.argsort(s_log)[::-1][:cfg.n_best]
            ends = np.argsort(e_log)[::-1][:cfg.n_best]
            for si in starts:
                if si >= len(offs) or offs[si] is None:
                    continue
                for ei in ends:
                    if ei >= len(offs) or offs[ei] is None or ei < si or ei - si + 1 > cfg.max_answer_length:
                        continue
                    score = float(s_log[si] + e_log[ei])
                    if score > best_score:
                        best_score, best_text = score, context[offs[si][0]:offs[ei][1]]
        qid = ds[ex]["id"]
        margins[qid] = null_score - best_score if math.isfinite(best_score) else math.inf
        preds[qid] = "" if version_2 and (margins[qid] > 0 or not math.isfinite(best_score)) else best_text
    return preds, margins


def finetune_qa(model_dir: str, task: TaskData, cfg: FinetuneConfig | None = None) -> dict:
    """Fine-tune ``model_dir`` on SQuAD v1.1 / v2.0 (``task.spec.name``); same result layout
    as :func:`finetune_classification`, metrics from the official scripts (percent)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    cfg = cfg or FinetuneConfig()
    spec = task.spec
    version_2 = spec.metrics == ("squad_v2",)
    t_start = time.perf_counter()
    _seed_all(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model_dir}: SQuAD needs a fast tokenizer (offset mappings)")
    with _quiet_transformers():
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir, ignore_mismatched_sizes=True).to(cfg.device)
    train_feats = qa_train_features(tokenizer, task.train, cfg)
    evals = {k: (ds, *qa_eval_features(tokenizer, ds, cfg)) for k, ds in task.evals.items()}

    def batches(gen):
        perm = torch.randperm(len(train_feats), generator=gen).tolist()
        for s in range(0, len(perm), cfg.batch_size):
            chunk = [dict(train_feats[i]) for i in perm[s:s + cfg.batch_size]]
            starts = [c.pop("start_positions") for c in chunk]
            ends = [c.pop("end_positions") for c in chunk]
            b = _collate(tokenizer, chunk)
            b["start_positions"], b["end_positions"] = torch.tensor(starts), torch.tensor(ends)
            yield b

    @torch.inference_mode()
    def evaluate():
        model.eval()
        out = {}
        for split, (ds, feats, example_of, offsets) in evals.items():
            starts, ends = [], []
            for s in range(0, len(feats), cfg.eval_batch_size):
                b = {k: v.to(cfg.device) for k, v in _collate(tokenizer, feats[s:s + cfg.eval_batch_size]).items()}
                o = model(**b)
                for row in range(o.start_logits.shape[0]):
                    n = int(b["attention_mask"][row].sum()) if "attention_mask" in b else o.start_logits.shape[1]
                    starts.append(o.start_logits[row, :n].float().cpu().numpy())
                    ends.append(o.end_logits[row, :n].float().cpu().numpy())
            preds, _ = qa_decode(ds, example_of, offsets, starts, ends, cfg, version_2)
            refs = {r["id"]: r["answers"]["text"] for r in ds}
            out[split] = M.squad_v2(preds, refs) if version_2 else M.squad_v1(preds, refs)
        return {"metrics": out}

    history = _train_epochs(model, len(train_feats), batches, cfg, evaluate, spec.name)
    final = history[-1]["metrics"]
    return {"metrics": final, "main": M.main_score(final["validation"]), "history": history,
            "train_examples": len(task.train), "train_features": len(train_feats),
            "eval_examples": {k: len(v[0]) for k, v in evals.items()},
            "seconds": time.perf_counter() - t_start}


def finetune(model_dir: str, task: TaskData, cfg: FinetuneConfig | None = None) -> dict:
    """Fine-tune and score ``model_dir`` on ``task`` (dispatches on the task kind)."""
    if task.spec.kind == "qa":
        return finetune_qa(model_dir, task, cfg)
    return finetune_classification(model_dir, task, cfg)
