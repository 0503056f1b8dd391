"""A single-process run listens on no wildcard address (issue 27): its process group needs no port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Runs in the child: a short distill through the command line's main() (which leaves the process
# group alive, as it is during training), then lists the listening TCP sockets this process owns.
PROBE = r'''
import json, os, sys
from homodistil.cli import main

assert main(sys.argv[1:]) == 0
mine = {os.readlink(f"/proc/self/fd/{fd}")[8:-1] for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:[")}
listening = []
for table in ("tcp", "tcp6"):
    for row in open(f"/proc/self/net/{table}").read().splitlines()[1:]:
        cols = row.split()
        if cols[3] == "0A" and cols[9] in mine:  # state 0A: LISTEN
            listening.append(cols[1])
print("LISTENING", json.dumps(listening))
'''


def _is_wildcard(address: str) -> bool:
    """``/proc/net/tcp{,6}`` address ``HEXIP:HEXPORT``: an all-zero IP is INADDR_ANY / in6addr_any."""
    return set(address.split(":")[0]) == {"0"}


def test_wildcard_detection():
    assert _is_wildcard("00000000:1F90") and _is_wildcard("00000000000000000000000000000000:735D")
    assert not _is_wildcard("0100007F:1F90") and not _is_wildcard("00000000000000000000000001000000:735D")


def test_a_single_process_run_listens_on_no_wildcard_address(tmp_path):
    argv = ["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path), "trainer.max_steps=2", "pruning.t_f=1"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}  # a plain single process
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(row for row in proc.stdout.splitlines() if row.startswith("LISTENING "))
    listening = json.loads(line.removeprefix("LISTENING "))
    assert not [a for a in listening if _is_wildcard(a)], listening


def test_two_processes_without_torchrun_listen_on_no_wildcard_address(tmp_path):
    """As srun or the deepspeed launcher start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, no agent
    store): rank 0 hosts the rendezvous store, bound to MASTER_ADDR."""
    from homodistil.engine.dist import _free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               GLOO_SOCKET_IFNAME="lo")
    argv = ["distill", "configs/tiny.yaml", *tiny_overrides(tmp_path), "trainer.max_steps=2", "pruning.t_f=1"]
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        line = next(row for row in out.splitlines() if row.startswith("LISTENING "))
        listening = json.loads(line.removeprefix("LISTENING "))
        assert not [a for a in listening if _is_wildcard(a)], listening
    assert "0100007F" in outputs[0][0]  # rank 0 holds the store, on 127.0.0.1


def test_the_store_socket_we_create_binds_the_rendezvous_address_only():
    """The TCPStore rank 0 hosts (dist._init_on_our_store) gets this socket."""
    import socket

    from homodistil.engine.dist import _listening_socket

    with socket.socket(fileno=_listening_socket("127.0.0.1", 0)) as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
