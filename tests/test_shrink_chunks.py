"""A large parameter streamed in row chunks gives exactly the pieces of the whole-tensor cut.

One world-size-2 torchrun launch (tests/chunked_shrink_runs.py) at ZeRO 0, 1, 2, 3 in fp32 and
ZeRO 2, 3 in bf16 (the config refuses bf16 at stage 0): after two AdamW steps, the pieces of the fp32 weights and
both Adam moments, cut to kept rows × kept columns, are bit-equal to this rank's piece of
``shrink_tensors``' cut of the full tensors, read whole and read in chunks of 2 to 6 rows.

In the same launch, at ZeRO-3: streaming a (65536, 256) embedding (64 MiB in fp32) cut to a quarter
of its columns peaks, in resident memory per rank, at the rank's share of the kept state plus three
4 MiB chunks when read in chunks (+ 8 MiB of slack), and above the share plus the whole 64 MiB
tensor when read whole. ``MALLOC_MMAP_THRESHOLD_`` as in test_shrink_memory.py: every tensor above
1 MiB is its own mapping, so freed tensors leave the resident set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from recipe_runs import REPO

CONFIGS = [{"stage": s, "bf16": False} for s in (0, 1, 2, 3)] + [{"stage": s, "bf16": True} for s in (2, 3)]
MIB = 2**20


def test_chunked_pieces_are_bit_equal_to_the_whole_tensor_cut(tmp_path):
    from homodistil.engine.dist import _free_port

    (tmp_path / "specs.json").write_text(json.dumps(CONFIGS + [{"memory": 3}]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "tests" / "chunked_shrink_runs.py"), str(tmp_path / "specs.json"), str(tmp_path / "records.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    *records, memory = torch.load(tmp_path / "records.pt", weights_only=False)
    peak, share = memory["memory"], memory["share"]
    assert share <= peak["chunked"] <= share + 3 * 4 * MIB + 8 * MIB, (peak, share)
    assert peak["whole"] >= share + 64 * MIB, (peak, share)
    assert [(r["stage"], r["bf16"]) for r in records] == [(c["stage"], c["bf16"]) for c in CONFIGS]
    for r in records:
        what = f"ZeRO-{r['stage']}{' bf16' if r['bf16'] else ''}"
        assert r["nonzero_moments"], what  # the moments carry something to compare
        assert r["chunked_pieces"] == 3 * 3, what  # 3 weights x (value, exp_avg, exp_avg_sq)
        assert r["whole"], f"{what}: whole-tensor pieces differ from the reference"
        assert r["chunked"], f"{what}: chunked pieces differ from the reference"
