"""Host memory: the peak of a section of a run (a shrink), from Linux's counters in /proc/self/status,
and glibc's handling of freed blocks on CPU runs (:func:`keep_freed_memory`).

``VmHWM`` is the process's peak resident set; writing 5 to /proc/self/clear_refs resets it to the
present resident set (Linux ≥ 4.0). Freed memory that the allocator keeps is resident and would be
reused unseen, so the start hands it back first (glibc's ``malloc_trim``): the figure is the peak
above what was live. Where any of this is unavailable (another OS) the figures are 0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
from pathlib import Path

_STATUS = Path("/proc/self/status")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h)


def _kib(field: str) -> int:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


def release() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap blocks resident,
    and a later allocation does not always reuse them: a shrink's new engine would come on top)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def start_peak() -> int:
    """Reset the peak to now; returns the resident bytes now (the base of :func:`peak_since`)."""
    release()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return 0
    return 1024 * _kib("VmRSS")


def peak_since(base: int) -> int:
    """Bytes the resident set peaked at above ``base`` since :func:`start_peak` returned it."""
    return max(0, 1024 * _kib("VmHWM") - base) if base else 0


def keep_freed_memory() -> str:
    """Have glibc keep freed blocks for reuse: no ``mmap`` for large blocks and no trimming of the heap's top.

    By default glibc maps every block above 32 MiB on its own and unmaps it when freed, so a CPU training step's
    large tensors (the (tokens × vocabulary) logits, activations, gradients) come back as fresh pages, each faulted
    in and zeroed by the kernel on every step: 35% of a step at the Llama shape of hidden 1024 on 2 cores
    (docs/profiling.md). Kept, they are reused; the resident set stays at its peak instead of breathing. Left as
    it is where the environment already sets glibc's allocator (``MALLOC_*``, ``GLIBC_TUNABLES``: the memory
    measurements set it on purpose) or where the C library is not glibc. Returns what was done, for the log."""
    chosen = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"host memory: glibc's allocator left as {', '.join(chosen)} set it"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "host memory: not glibc, its allocator left as it is"
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return "host memory: glibc refused mallopt, its allocator left as it is"
    return "host memory: freed blocks kept for reuse (glibc mallopt: no mmap, no trim; trainer.keep_freed_memory)"
