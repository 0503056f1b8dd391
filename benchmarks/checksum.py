"""What the checkpoint manifest's checksum costs: seconds per GB for CRC-32 (what
``homodistil.engine.checkpoint`` uses) and BLAKE2b, on a file in the page cache, and on the
newest checkpoint of a run directory if one is given.

    python benchmarks/checksum.py [RUN_DIR]
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from homodistil.engine import checkpoint

MIB = 512


def _seconds(fn) -> float:
    fn()  # warm: the file is read from the page cache, as right after a save
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "blob"
        blob.write_bytes(os.urandom(MIB * 2**20))
        for name, fn in [("crc32", lambda: checkpoint.checksum(blob)),
                         ("blake2b", lambda: hashlib.file_digest(blob.open("rb"), "blake2b"))]:
            print(f"{name}: {_seconds(fn) * 1024 / MIB:.2f} s per GB")
    if len(sys.argv) > 1:
        root = Path(sys.argv[1]) / "checkpoints"
        tag = checkpoint.find_latest(root)
        files = [p for p in (root / tag).iterdir() if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        seconds = _seconds(lambda: [checkpoint.checksum(p) for p in files])
        print(f"{root / tag}: {size / 2**20:.1f} MiB in {len(files)} files, CRC-32 in {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
