"""E2Style training: multi-stage encoders with the paper's losses, on one device, on local DDP processes, or
under Ray Train (DDP). This module is the entry point and the launcher; the parts live beside it:

    train_config.py   defaults, --set overrides, validation, output paths, file checks
    train_data.py     synthetic (w, G(w)) pairs and image datasets, deterministic per seed, stage, step, rank
    train_model.py    the stage-k model (earlier stages frozen), its forward, validation, checkpoints
    train_loop.py     train_stage / run_training: one rank's loop, resume, validation, logging
    train_metrics.py  metrics.jsonl and TensorBoard event files, the progress bar

    python run_pipeline.py train --config configs/train_synthetic.yaml [--set train.steps=200 ...]
    python -m pipeline.train --config ...                                   (the same)

``train.stages: [1, 2, 3]`` runs the stages one after the other, each starting from the previous one's final
checkpoint; a rerun with the same ``output_dir`` skips finished stages and resumes an unfinished one at its
saved step with its optimizer state. ``num_workers: N`` runs the same loop on N Ray Train workers
(workers/train_worker.py); ``run_local_ddp`` runs it on N local processes without Ray.

Data (``data.mode``): ``synthetic`` samples (w, G(w)) pairs from the generator on the fly; ``images`` reads
aligned faces with the pipeline's readers (image folders, WebDataset tars, Parquet; local or S3).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.checkpoint import CheckpointError
from models.losses import MissingPretrainedError
from workers.train_worker import run_ray_training

from .train_config import DEFAULTS, TrainConfigError, check_files, load_train_config, resolve_config, stage_paths
from .train_data import seeded_generator, synthetic_batch
from .train_loop import SimulatedCrash, run_training, train_stage
from .train_metrics import MetricsLogger
from .train_model import validate_model

# The names callers used when all of training was this one module (run_pipeline.py, benchmarks, tests).
__all__ = ["TrainConfigError", "DEFAULTS", "resolve_config", "load_train_config", "run_training", "train_stage",
           "stage_paths", "check_files", "validate_model", "synthetic_batch", "seeded_generator", "MetricsLogger",
           "SimulatedCrash", "run_local_ddp", "ddp_rank_main", "main"]


def ddp_rank_main(rank: int, world_size: int, cfg: dict, port: int) -> None:
    """One process of a local DDP group (the ``mp.spawn`` target): joins the group on 127.0.0.1:``port``
    (NCCL on GPUs, one per rank; gloo on CPU) and trains as that rank."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    use_cuda = cfg["train"]["device"] != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        if use_cuda:
            torch.cuda.set_device(rank)
        run_training(cfg, rank=rank, world_size=world_size, device=f"cuda:{rank}" if use_cuda else "cpu")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ddp(cfg: dict, world_size: int) -> list[dict]:
    """DDP on this machine without Ray: ``world_size`` processes (one per GPU, or gloo on CPU)."""
    check_files(cfg)
    mp.spawn(ddp_rank_main, args=(world_size, cfg, free_port()), nprocs=world_size, join=True)
    return [{"stage": k, "final": stage_paths(cfg, k)["final"]} for k in cfg["train"]["stages"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python run_pipeline.py train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", required=True, help="YAML training config (configs/train_*.yaml)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (train.steps=100); repeatable")
    args = ap.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        check_files(cfg)
    except (TrainConfigError, MissingPretrainedError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_ray_training(cfg) if cfg["num_workers"] is not None else run_training(cfg)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
