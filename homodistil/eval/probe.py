"""Frozen-model measurements of an exported model directory: a linear probe on mean-pooled
embeddings, CPU latency, and parameter counts.

The probe is a fast proxy for fine-tuning: the encoder stays frozen, texts are embedded once
(mean of the last hidden states over real tokens; for a text pair the features are
``[u, v, |u - v|, u * v]`` of the two texts' embeddings), and a standardised
``LogisticRegression`` (classification) or ``Ridge`` (regression) is fitted on the training
split and scored on the evaluation splits with the task's metrics.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from homodistil.eval import metrics as M
from homodistil.eval.tasks import TaskData


@dataclass
class ProbeConfig:
    batch_size: int = 64
    max_length: int = 128
    C: float = 1.0              # LogisticRegression inverse regularisation
    alpha: float = 1.0          # Ridge regularisation
    max_iter: int = 2000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder:
    """A frozen ``AutoModel`` + tokenizer from an exported directory (loaded once, reused)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import AutoModel
        from homodistil.eval.finetune import _quiet_transformers, load_tokenizer
        self.model_dir, self.device = str(model_dir), device
        self.tokenizer = load_tokenizer(model_dir)
        with _quiet_transformers():
            self.model = AutoModel.from_pretrained(model_dir).to(device).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64, max_length: int = 128,
              progress: bool = False, desc: str = "embed") -> np.ndarray:
        """Mean-pooled last hidden states, float32, shape ``(len(texts), hidden)``."""
        if not texts:
            raise ValueError("nothing to embed")
        order = np.argsort([len(t) for t in texts], kind="stable")      # similar lengths together
        out = None
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, leave=False, dynamic_ncols=True, desc=desc)
        for s in starts:
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled
        return out

    def features(self, ds, cfg: ProbeConfig, desc: str = "embed") -> np.ndarray:
        """Probe features of a split (single text, or ``[u, v, |u-v|, u*v]`` for pairs)."""
        u = self.embed(list(ds["text"]), cfg.batch_size, cfg.max_length, cfg.progress, desc)
        if "text_pair" not in ds.column_names:
            return u
        v = self.embed(list(ds["text_pair"]), cfg.batch_size, cfg.max_length, cfg.progress, desc)
        return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def linear_probe(encoder: Encoder | str, task: TaskData, cfg: ProbeConfig | None = None) -> dict | None:
    """Fit and score a linear probe; ``None`` for QA tasks (no probe defined). Returns
    ``{"metrics": {split: {...}}, "main": float (0-100), "train_examples", "seconds"}``."""
    if task.spec.kind == "qa":
        return None
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    enc = encoder if isinstance(encoder, Encoder) else Encoder(encoder, cfg.device)
    x_train = enc.features(task.train, cfg, f"{task.name} probe train")
    y_train = np.asarray(task.train["label"])
    if task.spec.kind == "regression":
        clf = make_pipeline(StandardScaler(), Ridge(alpha=cfg.alpha))
    else:
        if len(np.unique(y_train)) < 2:
            raise ValueError(f"{task.name}: the probe's training split holds a single class")
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter,
                                                                 random_state=cfg.seed))
    clf.fit(x_train, y_train)
    out = {}
    for split, ds in task.evals.items():
        preds = clf.predict(enc.features(ds, cfg, f"{task.name} probe {split}"))
        out[split] = M.compute(task.spec.metrics, preds, np.asarray(ds["label"]))
    return {"metrics": out, "main": M.main_score(out[task.spec.eval_splits[0]]),
            "train_examples": len(y_train), "seconds": time.perf_counter() - t0}


def count_parameters(model: torch.nn.Module | str) -> dict[str, int]:
    """Parameters of the bare encoder (``AutoModel``, no task head): ``total``,
    ``embedding`` (every ``nn.Embedding``) and ``non_embedding``."""
    if not isinstance(model, torch.nn.Module):
        model = Encoder(model).model
    seen, total, emb = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            emb += m.weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


@torch.inference_mode()
def measure_latency(model: torch.nn.Module | str, batch_size: int = 32, seq_len: int = 128,
                    repeats: int = 10, warmup: int = 2, threads: int | None = None,
                    device: str = "cpu", seed: int = 0) -> dict:
    """Forward time of the bare encoder on ``batch_size`` random sequences of ``seq_len``
    tokens (full attention mask). Returns ``{"median_ms", "min_ms", "max_ms", "batch_size",
    "seq_len", "repeats", "threads", "device"}``; the median is over ``repeats`` timed runs
    after ``warmup`` untimed ones."""
    if not isinstance(model, torch.nn.Module):
        model = Encoder(model, device).model
    model.eval()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        vocab = int(getattr(model.config, "vocab_size", 1000))
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        times = []
        for i in range(warmup + repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
        return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
                "max_ms": float(np.max(times)), "batch_size": batch_size, "seq_len": seq_len,
                "repeats": repeats, "threads": torch.get_num_threads(), "device": device}
    finally:
        torch.set_num_threads(old_threads)
