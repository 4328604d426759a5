"""DDP on this machine without Ray: ``world_size`` processes (one per GPU with NCCL, or gloo on CPU), each
running the training loop as one rank of the group."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import TrainConfig
from .loop import run_training
from .paths import check_files, stage_paths

__all__ = ["ddp_rank_main", "run_local_ddp"]

LOCALHOST = "127.0.0.1"


def ddp_rank_main(rank: int, world_size: int, cfg: TrainConfig, port: int) -> None:
    """One process of a local DDP group (the ``mp.spawn`` target): joins the group on 127.0.0.1:``port``
    (NCCL on GPUs, one per rank; gloo on CPU) and trains as that rank."""
    os.environ.setdefault("MASTER_ADDR", LOCALHOST)
    os.environ["MASTER_PORT"] = str(port)
    use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        if use_cuda:
            torch.cuda.set_device(rank)
        run_training(cfg, rank=rank, world_size=world_size, device=f"cuda:{rank}" if use_cuda else "cpu")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def run_local_ddp(cfg: TrainConfig, world_size: int) -> list[dict]:
    """Train ``train.stages`` on ``world_size`` local processes; one {'stage', 'final'} per stage."""
    check_files(cfg)
    mp.spawn(ddp_rank_main, args=(world_size, cfg, _free_port()), nprocs=world_size, join=True)
    return [{"stage": k, "final": stage_paths(cfg, k)["final"]} for k in cfg.train.stages]
