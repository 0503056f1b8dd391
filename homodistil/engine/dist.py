"""Distributed start-up: torchrun / deepspeed launcher / Slurm / a single process."""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, the deepspeed
    launcher), else Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, else runs as a single
    process on a free local port. Backend: NCCL on CUDA, gloo on CPU (DeepSpeed's choice).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    import deepspeed  # noqa: PLC0415  (slow import, only when a run starts)

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    return torch.device(get_accelerator().current_device_name())
