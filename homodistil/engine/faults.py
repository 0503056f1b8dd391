"""Fault injection for the fault-tolerance harness (``tests/test_faults.py``, ``benchmarks/faults.py``).

A no-op unless ``HOMODISTIL_FAULT`` is set when a run starts (:func:`configure`, called by
``Recipe.setup``). The recipe calls :func:`point` at a few named places and passes its loss
through :func:`loss`; a matching fault then acts on this process only::

    HOMODISTIL_FAULT="KIND@STEP[xCOUNT][:rank=R][:attempt=A][,...]"

    kill@7              SIGKILL at the end of step 7, before its checkpoint (a node death)
    term@5:rank=1       SIGTERM to rank 1 at the end of step 5 (preemption: every rank saves, then stops)
    kill_in_save@6      SIGKILL inside the save of step 6: DeepSpeed's files, rank files, pruner and
                        meta are written; MANIFEST.json, COMPLETE and ``latest`` are not
    enospc_in_save@6    OSError(ENOSPC) at the same place (a disk that fills during a save)
    kill_in_shrink@4    SIGKILL inside the shrink at the end of step 4: the engine is destroyed, the
                        smaller one not yet built nor restored
    nan@4x3             the loss of steps 4, 5, 6 becomes NaN (and with it every gradient)
    inf@4               the loss of step 4 becomes +Inf
    nan_grad@4          the loss of step 4 stays finite, its gradients become NaN

``rank`` defaults to every rank. ``attempt`` is the restart count that torchrun gives the
workers (``TORCHELASTIC_RESTART_COUNT``, default 0): a fault fires only in that attempt, so
``torchrun --max-restarts 1`` kills the first attempt and lets the relaunched one resume.
Step ``k`` is the ``k``-th optimizer step, as in the logs and the checkpoint tags.
"""
from __future__ import annotations

import errno
import os
import re
import signal
from dataclasses import dataclass

import torch

from homodistil.config import ConfigError

ENV = "HOMODISTIL_FAULT"
KINDS = ("kill", "term", "kill_in_save", "enospc_in_save", "kill_in_shrink", "nan", "inf", "nan_grad")
_POINT = {"kill": "step", "term": "step", "kill_in_save": "save", "enospc_in_save": "save",
          "kill_in_shrink": "shrink"}
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?:x(?P<count>\d+))?(?P<opts>(?::\w+=\d+)*)$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    count: int = 1
    rank: int | None = None
    attempt: int = 0

    def hits(self, step: int) -> bool:
        return self.step <= step < self.step + self.count


def parse(spec: str) -> list[Fault]:
    """``"kill@7:rank=1,nan@4x3"`` -> faults; a malformed spec is a :class:`ConfigError` naming it
    (a user's setting: one line, exit code 2)."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = _SPEC.match(item)
        if not m or m["kind"] not in KINDS:
            raise ConfigError(f"{ENV}: cannot parse '{item}' (expected KIND@STEP[xCOUNT][:rank=R][:attempt=A], "
                             f"KIND one of {', '.join(KINDS)})")
        opts = dict(o.split("=") for o in m["opts"].split(":")[1:])
        if set(opts) - {"rank", "attempt"}:
            raise ConfigError(f"{ENV}: unknown option in '{item}' (rank=, attempt=)")
        faults.append(Fault(m["kind"], int(m["step"]), int(m["count"] or 1),
                            int(opts["rank"]) if "rank" in opts else None, int(opts.get("attempt", 0))))
    return faults


_active: list[Fault] = []


def configure(rank: int) -> list[Fault]:
    """Read ``HOMODISTIL_FAULT`` for this process (rank, restart attempt); returns the armed faults."""
    global _active
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _active = [f for f in parse(os.environ.get(ENV, "")) if f.rank in (None, rank) and f.attempt == attempt]
    return list(_active)


def point(name: str, step: int) -> None:
    """A named place in the run (``step``: end of a step; ``save``: before COMPLETE is written;
    ``shrink``: between the engine's destroy and the rebuilt engine's restore)."""
    for f in _active:
        if _POINT.get(f.kind) == name and f.hits(step):
            if f.kind == "enospc_in_save":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected by {ENV})")
            os.kill(os.getpid(), signal.SIGTERM if f.kind == "term" else signal.SIGKILL)


def loss(value: torch.Tensor, step: int) -> torch.Tensor:
    """The loss of step ``step``, corrupted where a ``nan``/``inf``/``nan_grad`` fault says so."""
    for f in _active:
        if f.hits(step) and f.kind in ("nan", "inf"):
            return value * float(f.kind)
        if f.hits(step) and f.kind == "nan_grad":
            # forward: + sqrt(0) = +0; backward: d sqrt(u)/du at u = 0 is inf, times 0 -> NaN everywhere
            return value + (value * 0.0).sqrt()
    return value
