"""glibc keeps freed blocks for reuse on CPU runs (``hostmem.keep_freed_memory``): measured as page faults.

Each case runs in a fresh process (glibc reads its ``MALLOC_*`` variables once, at start, and a setting
changed here would stay for the rest of the suite): it allocates and frees a 64 MiB tensor (above glibc's
largest mmap threshold, 32 MiB), writing it whole each time, and counts the minor page faults of rounds 21 to
40. Mapped afresh each round, that is one fault per 4 KiB page, about 16k a round. Kept, the heap first grows
for a few rounds (torch asks for 64-byte alignment, and glibc's aligned allocation needs a little more than
the block just freed, until freed neighbours coalesce: 6 rounds here), then no round faults.
"""
import os
import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys, torch
from homodistil.engine import hostmem
said = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else "left alone"
for _ in range(20):  # the heap settles (kept) or not (the default)
    torch.empty(1 << 24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(1 << 24).fill_(1.0)  # (64 MiB of fp32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(said)
"""
PAGES_PER_ROUND = (64 << 20) // 4096


def rounds(mode: str, **env) -> tuple[int, str]:
    """(minor page faults of rounds 21-40, what keep_freed_memory said) in a fresh process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], env={**clean, **env}, capture_output=True,
                          text=True, timeout=300, check=True)
    faults, said = done.stdout.strip().splitlines()[-2:]
    return int(faults), said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's fault counters")
def test_freed_blocks_are_reused_not_faulted_in_again():
    system, _ = rounds("system")
    kept, said = rounds("keep")
    assert system > 10 * PAGES_PER_ROUND, system  # the default: fresh pages every round (≈ 20 × 16k faults)
    assert kept < PAGES_PER_ROUND, kept  # kept: not even one round's worth
    assert said.startswith("host memory: freed blocks kept for reuse"), said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's fault counters")
def test_an_allocator_the_environment_sets_is_left_alone():
    """The memory measurements set MALLOC_MMAP_THRESHOLD_ on purpose: then nothing changes, and the log says why."""
    faults, said = rounds("keep", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert faults > 10 * PAGES_PER_ROUND, faults
    assert said == "host memory: glibc's allocator left as MALLOC_MMAP_THRESHOLD_ set it", said
