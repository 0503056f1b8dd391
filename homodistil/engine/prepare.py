"""Teacher preparation: give a teacher without a masked-LM head a trained one.

Sentence encoders such as all-MiniLM-L6-v2 ship the BERT encoder only. HomoDistil needs the
teacher's MLM distribution (the prediction KL), so the head is created (decoder tied to the
word embeddings, as in BERT) and the *whole* model is trained by continued MLM on the run's
text (loss on the masked positions only). The result is cached by everything that defines it,
so a second run reuses it. A teacher that already has a head is returned as it is.

A long preparation (thousands of steps on a CPU) is not lost to an interruption: at every plateau
check the model, optimizer, schedule, RNG and curve are saved beside the cache entry
(``<entry>.partial``), and the next preparation of the same entry continues from there, bit for bit
as if it had not stopped (:func:`_save_snapshot`, :func:`_load_snapshot`).

The cache entry is owner-only (``tempfile.mkdtemp`` makes it 0700, the rename keeps it) and its
marker records the SHA-256 of every file published beside it: a run checks them before using the
teacher, and a changed, added or missing file stops it with one line (:func:`verify_prepared`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import os

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForMaskedLM

from homodistil.config import PrepareConfig
from homodistil.data.batches import BlockBatches

from .checkpoint import safe_load
from .models import ModelError
from .private import private_dir

log = logging.getLogger("homodistil.prepare")
PREP_FILE = "homodistil_prepare.json"


def missing_head(source: str) -> list[str]:
    """Parameter names of the MLM head that ``source`` does not provide (empty: it has a head)."""
    import transformers  # noqa: PLC0415

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized weights" warning is expected here
    try:
        _, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return sorted(info["missing_keys"])


def fingerprint(source: str) -> str:
    """What a model or tokenizer is, not where it lies: the SHA-1 of the files of a local
    directory (so a reinstall elsewhere, or a copy, reuses the prepared teacher, and changed
    weights do not), or the hub id itself."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return source
    digest = hashlib.sha1()
    for file in sorted(f for f in path.iterdir() if f.is_file()):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_dir(source: str, data_key: str, cfg: PrepareConfig) -> Path:
    """The prepared teacher's directory, keyed on the teacher's files, the data (``data_key``,
    in which local tokenizers should appear by :func:`fingerprint`) and the preparation settings."""
    key = json.dumps([fingerprint(source), data_key, cfg.model_dump(exclude={"cache_dir"})])
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "homodistil" / "teachers"
    return root / f"{Path(source).name}-mlm-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under a prepared teacher's ``directory`` but its marker, by relative path."""
    digests = {}
    for file in sorted(f for f in directory.rglob("*") if f.is_file() and f.name != PREP_FILE):
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        digests[file.relative_to(directory).as_posix()] = digest.hexdigest()
    return digests


def verify_prepared(directory: Path) -> None:
    """Raise :class:`ModelError` (one line) unless the prepared teacher's files are exactly the ones
    whose SHA-256 its marker recorded when it was published.

    A mismatch is an error, not a reason to prepare again: re-preparing would have to delete a
    directory whose contents are not ours any more (another run may be reading it), and would hide
    that someone changed a cache only its owner should write. The line says which file and how to
    start over."""
    start_over = f"delete {directory} to prepare the teacher again"
    try:
        recorded = json.loads((directory / PREP_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"prepared teacher {directory}: unreadable {PREP_FILE} ({err}): {start_over}") from None
    if not isinstance(recorded, dict):
        raise ModelError(f"prepared teacher {directory}: {PREP_FILE} records no SHA-256 of its files "
                         f"(prepared by an older homodistil), so it cannot be checked: {start_over}")
    found = file_digests(directory)
    changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
    if changed:
        what = "missing" if changed[0] not in found else "not recorded" if changed[0] not in recorded else \
            "changed since it was prepared (SHA-256 mismatch)"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ModelError(f"prepared teacher {directory}: {changed[0]} is {what}{more}: {start_over}")


def _masked_logits(model, head: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (M, V) and labels (M,) at the masked positions only (the head is the big GEMM)."""
    scored = batch["labels"] != -100
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_submodule(head)(hidden[scored]), batch["labels"][scored]


@torch.no_grad()
def masked_accuracy(model, head: str, data: BlockBatches, batch_size: int, limit: int = 64) -> tuple[float, float]:
    """(accuracy, mean loss) of the MLM predictions on held-out blocks' masked tokens."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in data.heldout_batches(batch_size, limit):
        logits, labels = _masked_logits(model, head, batch)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / max(1, total), loss_sum / max(1, total)


def prepare_teacher(source: str, out: Path, data: BlockBatches, cfg: PrepareConfig, head: str, tokenizer,
                    progress: bool = True) -> dict:
    """Train an MLM head (and the encoder under it) for ``cfg.steps`` steps; save to ``out``.

    Runs under its own RNG (``cfg.seed``, forked): the caller's stream — the run's dropout —
    is the same whether the teacher was prepared now or read from the cache. Writes to a
    per-process temporary directory beside ``out`` and renames it into place, so concurrent
    preparations (``compare --jobs 2`` on a cold cache) cannot mix files; the first to finish wins.
    The marker, written last, records the SHA-256 of every other file (:func:`verify_prepared`).
    """
    private_dir(out.parent)
    partial = private_dir(out.parent / f"{out.name}.partial")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        info, model = _train_head(source, data, cfg, head, progress, partial)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))  # mode 0700
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {**info, "sha256": file_digests(tmp)}
    (tmp / PREP_FILE).write_text(json.dumps(info, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process published the same preparation first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / PREP_FILE).exists():
            raise
        info = json.loads((out / PREP_FILE).read_text())
    shutil.rmtree(partial, ignore_errors=True)
    log.info("prepared teacher %s: held-out masked-token accuracy %.1f%% -> %.1f%%", source,
             100 * info["heldout_masked_accuracy_before"], 100 * info["heldout_masked_accuracy"])
    return info


def _plateaued(model, head: str, data: BlockBatches, cfg: PrepareConfig, curve: list, step: int) -> bool:
    """Score the held-out MLM loss after ``step`` steps (appended to ``curve``); True once it improved on the
    previous score by less than ``cfg.plateau_delta`` nats: the teacher has stopped getting better on this data."""
    loss = masked_accuracy(model, head, data, cfg.batch_size, limit=cfg.plateau_blocks)[1]
    model.train()
    curve.append((step, loss))
    log.info("teacher preparation: held-out MLM loss %.4f after %d steps", loss, step)
    return len(curve) > 1 and curve[-2][1] - loss < cfg.plateau_delta


def load_surprises(info: dict, head: str) -> list[str]:
    """What a head-less teacher's loading report holds beyond what adding a head explains: missing
    tensors outside ``head``, unexpected ones other than the encoder's pooler (an MLM model has
    none), mismatched shapes and load errors."""
    missing = [k for k in info["missing_keys"] if not k.startswith(f"{head}.")]
    unexpected = [k for k in info["unexpected_keys"] if not (k.startswith("pooler.") or ".pooler." in k)]
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    return ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
            + [f"mismatched {k}" for k in mismatched] + [str(e) for e in info.get("error_msgs", [])])


def load_headless(source: str, head: str):
    """``source`` as a masked LM whose ``head`` is newly initialised, saying so in one line.

    transformers would print its LOAD REPORT table (the head's tensors MISSING, the pooler's
    UNEXPECTED) at every preparation; that is the expected case here, so the table is silenced and
    only what it cannot explain is logged as a warning."""
    import transformers  # noqa: PLC0415

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    fresh = sum(k.startswith(f"{head}.") for k in info["missing_keys"])
    log.info("teacher %s has no MLM head: a new one (%d tensors under '%s') is trained before distillation",
             source, fresh, head)
    surprises = load_surprises(info, head)
    if surprises:
        log.warning("teacher %s: loading it as a masked LM also reported: %s", source, "; ".join(surprises))
    return model


def _save_snapshot(partial: Path, model, opt, sched, step: int, state: dict) -> None:
    """Everything :func:`_train_head` needs to continue after ``step`` steps (weights, optimizer and
    schedule state, the RNG, the curve: tensors and plain data), replaced atomically: a process
    killed while writing leaves the previous snapshot."""
    tmp = partial / "snapshot.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "rng": torch.get_rng_state(), **state}, tmp)
    os.replace(tmp, partial / "snapshot.pt")


def _load_snapshot(partial: Path, model, opt, sched) -> dict | None:
    """Restore the snapshot in ``partial`` into ``model``, ``opt``, ``sched`` and the RNG; its plain
    data (``step``, ``curve``, the scores before training), or None when there is none. The file is
    read as untrusted: tensors and plain data only (:func:`checkpoint.safe_load`)."""
    if not (partial / "snapshot.pt").is_file():
        return None
    state = safe_load(partial / "snapshot.pt")
    model.load_state_dict(state.pop("model"))
    opt.load_state_dict(state.pop("optimizer"))
    sched.load_state_dict(state.pop("schedule"))
    torch.set_rng_state(state.pop("rng"))
    log.info("teacher preparation: continuing from the snapshot after %d steps in %s", state["step"], partial)
    return state


def _train_head(source: str, data: BlockBatches, cfg: PrepareConfig, head: str, progress: bool, partial: Path):
    """(info, model): continued MLM training of ``source`` with a new head, on the caller's RNG,
    continued from the snapshot in ``partial`` if an earlier preparation left one."""
    model = load_headless(source, head)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    resumed = _load_snapshot(partial, model, opt, sched)
    if resumed is None:
        acc_before, loss_before = masked_accuracy(model, head, data, cfg.batch_size)
        start, curve = 0, []  # curve: (steps trained, held-out MLM loss) at each plateau check
    else:  # the snapshot was taken right after the check at its step, which found no plateau
        acc_before, loss_before, start, curve = (resumed["acc_before"], resumed["loss_before"], resumed["step"],
                                                 [tuple(c) for c in resumed["curve"]])
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="preparing teacher (MLM head)", unit="step", disable=not progress,
               initial=start, total=cfg.steps)
    for step in bar:
        if cfg.plateau_every and step and step % cfg.plateau_every == 0 and step != start:
            if _plateaued(model, head, data, cfg, curve, step):
                break
            _save_snapshot(partial, model, opt, sched, step,
                           {"curve": curve, "acc_before": acc_before, "loss_before": loss_before})
        batch = data.batch(step, 0, grad_accum=1, micro_batch=cfg.batch_size, rank=0, world=1)
        logits, labels = _masked_logits(model, head, batch)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    else:
        step = cfg.steps
    bar.close()
    acc_after, loss_after = masked_accuracy(model, head, data, cfg.batch_size)
    info = {"source": source, "steps": step, "max_steps": cfg.steps, "plateau": curve, "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "heldout_masked_accuracy_before": acc_before, "heldout_masked_accuracy": acc_after,
            "heldout_mlm_loss_before": loss_before, "heldout_mlm_loss": loss_after}
    return info, model
