"""Distributed start-up: torchrun / deepspeed launcher / Slurm / a single process."""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    """A port free on the loopback interface (for launchers started by the tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, the deepspeed
    launcher), else Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, else runs as a single
    process whose group lives on an in-process store (no port at all). Backend: NCCL on CUDA,
    gloo on CPU (DeepSpeed's choice).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("LOCAL_RANK", "0")
    # No launcher's rendezvous port: nobody else will join, whatever set RANK (an earlier run
    # in this process, or a single Slurm task).
    single = env["WORLD_SIZE"] == "1" and "MASTER_PORT" not in env
    import deepspeed  # noqa: PLC0415  (slow import, only when a run starts)

    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if not torch.distributed.is_initialized():
        if single:
            _init_single_process()
        elif env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(env.get("TORCHELASTIC_RESTART_COUNT", "0")):
            _init_on_our_store(rank, world)
        # else: a first torchrun attempt joins the agent's store through env://
        deepspeed.init_distributed(verbose=False)  # adopts an initialised group as it is
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def shutdown_distributed() -> None:
    """Destroy the process group, if any, while the interpreter is still whole.

    Left to interpreter exit, gloo's worker threads can still hold finished async work (ZeRO-3's
    parameter all-gathers) whose tensors are then freed during finalization: the process aborts
    with "terminate called without an active exception" (SIGABRT) after a run that succeeded
    (seen once in CI, rank 1 of a ZeRO-3 offloaded teacher at world size 2, torch 2.13).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _init_single_process() -> None:
    """World size 1: a group on an in-process ``HashStore``, so no store listens on any port.

    The env:// path would start a TCPStore, which binds every interface whatever MASTER_ADDR
    says (a wildcard listener for the whole run). Gloo still opens its own device socket on the
    address the host name resolves to; pinning it to the loopback interface (unless the user
    named one) keeps a single-process run unreachable from other machines.
    """
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    if "lo" in (name for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group(get_accelerator().communication_backend_name(),
                                         store=torch.distributed.HashStore(), rank=0, world_size=1)


def _listening_socket(host: str, port: int) -> int:
    """A socket listening on ``host:port`` only (not on every interface); returns its fd."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen()
    return sock.detach()


def _init_on_our_store(rank: int, world: int) -> None:
    """Join the group through a TCPStore we create, where no launcher's agent already serves one.

    Rank 0 hosts the store (Slurm's srun, the deepspeed launcher, torchrun without an agent
    store): torch's env:// rendezvous would bind it to every interface whatever MASTER_ADDR says,
    so it is handed a socket bound to MASTER_ADDR, which is all the other ranks need to reach.

    Workers restarted by ``torchrun --max-restarts`` join through a per-attempt key prefix: the
    agent's store outlives the killed workers and still holds their addresses under the same
    keys, so a new worker could read a dead peer's address and fail to connect (seen with gloo,
    static and c10d rendezvous, torch 2.13).
    """
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    env = os.environ
    hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    store = torch.distributed.TCPStore(host, port, world, is_master=hosts,
                                       timeout=torch.distributed.constants.default_pg_timeout,
                                       master_listen_fd=_listening_socket(host, port) if hosts else None)
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt:
        store = torch.distributed.PrefixStore(f"attempt{attempt}", store)
    torch.distributed.init_process_group(get_accelerator().communication_backend_name(), store=store,
                                         rank=rank, world_size=world)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    return torch.device(get_accelerator().current_device_name())
