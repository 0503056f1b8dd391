"""Peak host memory of a section of a run (a shrink), from Linux's counters in /proc/self/status.

``VmHWM`` is the process's peak resident set; writing 5 to /proc/self/clear_refs resets it to the
present resident set (Linux ≥ 4.0). Freed memory that the allocator keeps is resident and would be
reused unseen, so the start hands it back first (glibc's ``malloc_trim``): the figure is the peak
above what was live. Where any of this is unavailable (another OS) the figures are 0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

_STATUS = Path("/proc/self/status")


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
