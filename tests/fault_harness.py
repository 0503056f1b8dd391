"""The fault-injection harness: a tiny distill-while-prune job at world size 2 (gloo), a fault
injected into it (``homodistil.engine.faults``), the job relaunched, and its end compared with
an uninterrupted run of the same job.

The job (``JOB``): 10 steps of a 2-layer BERT, dropout on (so the RNG state must survive),
masks every 2 steps (2, 4, 6, 8), shrinks at 4 and 8 (``t_f``), checkpoints every 3 steps (3, 6,
9) and at the end (10). A fault at the end of step ``k`` loses the steps since the newest
checkpoint before ``k``; SIGTERM saves at ``k`` and loses none.

Relaunching: a killed run is relaunched by ``torchrun --max-restarts 1`` (how a user runs it:
the agent restarts both workers, which resume from ``latest``); faults fire only in the first
attempt. A run stopped by SIGTERM (preemption) or by a full disk exits by itself and is
relaunched by the harness, as a scheduler's requeue or the user would.

Used by ``tests/test_faults.py`` (a few fixed and seeded trials) and ``benchmarks/faults.py``
(N seeded trials and the figures table).
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_overrides  # noqa: E402

STEPS, SAVE_EVERY, MASK_EVERY, SHRINK_EVERY, T_F = 10, 3, 2, 4, 8
JOB = ["trainer.max_steps=10", f"trainer.save_every={SAVE_EVERY}", f"pruning.mask_interval={MASK_EVERY}",
       f"pruning.shrink_interval={SHRINK_EVERY}", f"pruning.t_f={T_F}", "model.dropout=0.1",
       "deepspeed.train_micro_batch_size_per_gpu=2"]
FINAL = f"step{STEPS:08d}"


def job(out: Path, stage: int = 2, streaming: bool = False, teacher_zero3: bool = False) -> list[str]:
    return tiny_overrides(out) + JOB + [f"deepspeed.zero_optimization.stage={stage}",
                                        f"data.streaming={str(streaming).lower()}",
                                        f"model.teacher_zero3={str(teacher_zero3).lower()}"]


def launch(overrides: list[str], fault: str = "", max_restarts: int = 0, timeout: int = 600):
    """One torchrun of ``homodistil distill`` at world size 2; returns the CompletedProcess."""
    from homodistil.engine.dist import _free_port  # noqa: PLC0415

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOMODISTIL_FAULT": fault,
           "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", str(max_restarts), "--monitor-interval", "0.1",
           "-m", "homodistil.cli", "distill", str(REPO / "configs" / "tiny.yaml"), *overrides, "trainer.progress=false"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# comparing two runs
# ---------------------------------------------------------------------------------------------

def _equal(a, b) -> bool:
    """Exact equality of anything torch.load returns (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        return type(a) is type(b) and _equal(vars(a), vars(b))
    return a == b


def compare(reference: Path, run: Path, tag: str = FINAL) -> dict[str, bool]:
    """Which parts of ``run``'s checkpoint ``tag`` equal ``reference``'s exactly."""
    from homodistil.engine import checkpoint  # noqa: PLC0415
    from homodistil.engine.export import _full_state  # noqa: PLC0415

    ref, got = reference / "checkpoints" / tag, run / "checkpoints" / tag
    if not (got / "COMPLETE").exists():
        return {"finished": False}
    wa, wb = _full_state(ref.parent, tag), _full_state(got.parent, tag)
    pa, pb = (torch.load(d / "pruner.pt", weights_only=False) for d in (ref, got))
    names = sorted(p.name for p in ref.iterdir())
    return {
        "finished": True,
        "weights": _equal(wa, wb),
        "masks": _equal(pa["masks"], pb["masks"]),
        "importance": _equal(pa["scores"], pb["scores"]) and pa["observed"] == pb["observed"] and _equal(
            *(list(checkpoint.importance_states(d.parent, tag)) for d in (ref, got))),
        "all_files": names == sorted(p.name for p in got.iterdir()) and all(
            _equal(torch.load(ref / n, weights_only=False), torch.load(got / n, weights_only=False))
            if n.endswith(".pt") else (ref / n).read_bytes() == (got / n).read_bytes()
            for n in names if n != "MANIFEST.json"),  # checksums of pickles that may differ byte-wise, not in value
        "losses": _losses(reference) == _losses(run),
    }


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------------

@dataclass
class Trial:
    fault: str  # a HOMODISTIL_FAULT spec with one fault, e.g. "kill@5:rank=1"
    stage: int = 2
    streaming: bool = False
    teacher_zero3: bool = False  # the frozen teacher partitioned by its own ZeRO-3 engine

    @property
    def config(self) -> tuple[int, bool, bool]:
        """What the uninterrupted reference run must share with this trial."""
        return self.stage, self.streaming, self.teacher_zero3

    @property
    def kind(self) -> str:
        return self.fault.split("@")[0]

    @property
    def step(self) -> int:
        return int(re.match(r"\w+@(\d+)", self.fault).group(1))

    def last_checkpoint(self) -> int:
        """The newest complete checkpoint when the fault strikes (SIGTERM's own save included)."""
        if self.kind == "term":
            return self.step
        return (self.step - 1) // SAVE_EVERY * SAVE_EVERY  # the save at the fault's step is lost


@dataclass
class Result:
    trial: Trial
    launches: int = 0
    fault_seen: bool = False  # the fault's effect is in the log (a killed worker, a saved stop, an error line)
    resumed_from: int | None = None
    removed_partial: bool = False
    message: str = ""
    exact: dict[str, bool] = field(default_factory=dict)
    log: str = ""

    @property
    def steps_lost(self) -> int | None:
        return None if self.resumed_from is None else self.trial.step - self.resumed_from

    @property
    def lost_beyond_checkpoint(self) -> int | None:
        return None if self.resumed_from is None else self.trial.last_checkpoint() - self.resumed_from

    @property
    def resumed_exactly(self) -> bool:
        return bool(self.exact) and all(self.exact.values())


def run_trial(trial: Trial, out: Path, reference: Path) -> Result:
    """Run ``trial`` in ``out``, relaunch as a user would, compare with ``reference``."""
    result = Result(trial)
    overrides = job(out, *trial.config)
    if trial.kind in ("kill", "kill_in_save", "kill_in_shrink"):
        procs = [launch(overrides, trial.fault, max_restarts=1)]  # torchrun relaunches the killed job
        result.fault_seen = re.search(r"exitcode: -9\b", procs[0].stderr) is not None  # torchrun saw a SIGKILL
    else:  # SIGTERM or a full disk: the job stops by itself; the requeued / relaunched job resumes
        procs = [launch(overrides, trial.fault)]
        if trial.kind == "term":
            result.fault_seen = procs[0].returncode == 0 and f"SIGTERM: saving at step {trial.step}" in procs[0].stdout
        else:
            errors = [line for line in procs[0].stderr.splitlines() if line.startswith("homodistil: error:")]
            result.message = errors[0] if errors else ""
            result.fault_seen = procs[0].returncode != 0 and bool(errors)
        procs.append(launch(overrides))
    result.launches = len(procs)
    result.log = "\n".join(p.stdout + p.stderr for p in procs)
    resumed = re.findall(r"resumed from step (\d+)", result.log)
    result.resumed_from = int(resumed[0]) if resumed else (0 if result.fault_seen else None)
    result.removed_partial = "removed incomplete checkpoint(s)" in result.log
    if procs[-1].returncode == 0:
        result.exact = compare(reference, out)
    else:
        result.exact = {"finished": False}
    return result


def ci_trials(seed: int = 0) -> list[Trial]:
    """The fixed trials of the test suite and one seeded random kill at a step they leave out."""
    rng = random.Random(seed)
    step = rng.choice([s for s in range(1, STEPS) if s not in (3, 4, 7)])
    return [
        Trial("kill@3:rank=0"),       # before the first checkpoint, before the mask update + shrink at 4
        Trial("kill@4:rank=1"),       # right after a mask update and a shrink
        Trial("kill@7:rank=0"),       # right before the last mask update and shrink (8)
        Trial(f"kill@{step}:rank={rng.randint(0, 1)}"),
        Trial("term@5:rank=1"),       # preemption: saves at 5
        Trial("kill_in_save@6:rank=0"),  # files written, COMPLETE not
        Trial("enospc_in_save@6:rank=1"),  # a disk that fills on one rank while saving
        Trial("kill_in_shrink@4:rank=1"),  # between the engine's destroy and the restore
        Trial("kill_in_shrink@8:rank=0", stage=3),  # the same with ZeRO-3 partitions
        Trial("kill@5:rank=0", teacher_zero3=True),  # the teacher partitioned by its own ZeRO-3 engine
    ]


def random_trials(n: int, seed: int) -> list[Trial]:
    """``n`` seeded trials: the kinds in turn (SIGKILL at a step every other trial), then the
    step, rank, ZeRO stage and data (pre-built or streamed) drawn at random."""
    rng = random.Random(seed)
    kinds = ["kill", "term", "kill", "kill_in_save", "kill", "enospc_in_save", "kill_in_shrink"]
    trials = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind.endswith("_save"):
            step = rng.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
        elif kind == "kill_in_shrink":  # the job's shrinks: every SHRINK_EVERY steps, and from t_f on
            step = rng.choice([s for s in range(1, STEPS) if s % SHRINK_EVERY == 0 or s >= T_F])
        else:
            step = rng.randint(1, STEPS - 1)
        trials.append(Trial(f"{kind}@{step}:rank={rng.randint(0, 1)}", stage=rng.choice([0, 1, 2, 3]),
                            streaming=rng.random() < 0.25))
    return trials


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

SEQ, GLOBAL_BATCH = 32, 8  # the data side of the tiny job (blocks of 32 tokens, 2 ranks x 4)
LINE = "In the beginning God created the heaven and the earth, and the earth was without form."


def _text_dir(tmp: Path, **extra: bytes) -> Path:
    """A directory with two good shards (and ``extra`` files: name -> bytes)."""
    d = tmp / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (d / f"good{i}.txt").write_text("\n\n".join(f"{LINE} ({i}.{j})" for j in range(40)))
    for name, data in extra.items():
        (d / name).write_bytes(data)
    return d


def _dangling(tmp: Path) -> str:
    d = _text_dir(tmp)
    (d / "shard3.txt").symlink_to(tmp / "gone" / "shard3.txt")
    return str(d)


def _short_docs(tmp: Path) -> str:
    (tmp / "short.txt").write_text("\n\n".join(f"Verse {i}: and God saw the light." for i in range(400)))
    return str(tmp / "short.txt")


def _bad_cache(how: str):
    def make(tmp: Path) -> str:
        from homodistil.data.batches import build_blocks  # noqa: PLC0415

        source = str(_text_dir(tmp))
        build_blocks(source, tokenizer(), SEQ, cache_dir=tmp / "cache")
        (cache,) = (tmp / "cache").glob("blocks-*.pt")
        if how == "truncated":
            cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
        elif how == "garbage":
            cache.write_bytes(os.urandom(4096))
        else:  # loadable, but a token changed behind the checksum's back
            saved = torch.load(cache, weights_only=True)
            saved["blocks"][0, 1] += 1
            torch.save(saved, cache)
        return source
    return make


# (what, how to make it -> data.source, expected outcome: "error: FRAGMENT" / "log: FRAGMENT" / "ok")
BAD_INPUTS = [
    ("empty file among the shards of a directory", lambda t: str(_text_dir(t, **{"empty.txt": b"\n \n"})),
     "log: skipped 1 empty file(s): empty.txt"),
    ("the only source is an empty file", lambda t: str(_text_dir(t, **{"empty.txt": b""}) / "empty.txt"),
     "error: empty.txt: no text found (empty file)"),
    ("non-UTF-8 bytes in a shard", lambda t: str(_text_dir(t, **{"latin1.txt": "caf\xe9 au lait".encode("latin-1")})),
     "error: latin1.txt: not UTF-8 text (byte 3)"),
    ("a JSONL line without the text field", lambda t: str(_text_dir(t, **{"x.jsonl": b'{"text": "ok"}\n{"body": 1}\n'})),
     "error: x.jsonl:2: not a JSON object with a 'text' field"),
    ("a missing shard in a list of sources", lambda t: [str(_text_dir(t)), str(t / "shard9.txt")],
     "error: shard9.txt' is neither a known corpus"),
    ("a dangling link to a shard in a directory", _dangling, "error: shard3.txt: cannot read (No such file or directory)"),
    ("documents shorter than the sequence length", _short_docs, "ok"),
    ("too little text for one block", lambda t: str(_text_dir(t, **{"one.txt": b"Amen."}) / "one.txt"),
     "error: too few for one block of 32"),
    ("too little text for one global batch", lambda t: (t / "few.txt").write_text(" ".join([LINE] * 12)) and str(t / "few.txt"),
     "error: fewer than one global batch (8)"),
    ("truncated token cache", _bad_cache("truncated"), "log: corrupt token cache"),
    ("token cache overwritten with garbage", _bad_cache("garbage"), "log: corrupt token cache"),
    ("token cache altered (checksum)", _bad_cache("altered"), "log: corrupt token cache (checksum mismatch)"),
]


def tokenizer():
    from transformers import AutoTokenizer  # noqa: PLC0415

    from homodistil.engine.models import minilm_dir  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(minilm_dir())


def try_input(make, tmp: Path) -> tuple[str, str]:
    """Set up a bad input, then do what the recipe's set-up does with it (read, tokenize, pack,
    cache, split, check one global batch). Returns (outcome, message): ``error`` with the
    one-line DataError, ``log`` with the warnings logged, or ``ok`` with the block count."""
    import logging  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from homodistil.data.corpora import DataError  # noqa: PLC0415
    from homodistil.data.batches import BlockBatches, build_blocks, check_global_batch  # noqa: PLC0415

    tmp.mkdir(parents=True, exist_ok=True)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("homodistil")
    logger.addHandler(handler)
    try:
        source = make(tmp)
        tok = tokenizer()
        blocks = build_blocks(source, tok, SEQ, cache_dir=tmp / "cache")
        data = BlockBatches(blocks, tok, mlm_probability=0.15, seed=0, heldout_fraction=0.05)
        check_global_batch(data, GLOBAL_BATCH, SimpleNamespace(source=source, max_seq_length=SEQ))
    except DataError as err:
        return "error", str(err)
    finally:
        logger.removeHandler(handler)
    if records:
        return "log", " | ".join(records)
    return "ok", f"{len(blocks)} blocks of {SEQ} tokens"
