"""Ray Train wrapper of the training loop (``pipeline.training.loop.run_training``): a TorchTrainer whose workers
each run the plain loop as one DDP rank (the trainable encoder is wrapped in DistributedDataParallel when there
is more than one). Ray is imported where used, so importing this module (the training CLI does) costs nothing.

Config keys: ``num_workers`` (ranks), ``use_gpu`` (one GPU each), ``ray.address`` (join a cluster; null =
a local Ray), ``ray.cpus_per_worker``. ``output_dir`` must be visible to every worker (a shared filesystem
on a multi-node cluster): rank 0 writes the checkpoints there and every rank resumes from them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from pipeline.training.config import TrainConfig
from pipeline.training.loop import run_training
from pipeline.training.paths import check_files, stage_paths

__all__ = ["train_loop_per_worker", "run_ray_training"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.use_gpu else "cpu"  # CPU threads: the worker's share (the loop)

    def report(metrics: dict) -> None:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})

    run_training(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device, report=report)


def run_ray_training(cfg: TrainConfig) -> list[dict]:
    """Run ``run_training`` on ``num_workers`` Ray Train workers; returns one result per stage
    (read back from the checkpoints rank 0 wrote)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_files(cfg)  # before any worker starts
    started = False
    if not ray.is_initialized():
        # No address: a fresh embedded instance (address="local"), never a running local cluster that a
        # plain ray.init() would join (pipeline/cluster.py does the same for inversion jobs).
        kw = {"address": cfg.ray.address} if cfg.ray.address else {"address": "local", "include_dashboard": False}
        ray.init(**kw)
        started = True
    try:
        cfg = dataclasses.replace(cfg, output_dir=os.path.abspath(cfg.output_dir))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg},
            scaling_config=ScalingConfig(num_workers=int(cfg.num_workers), use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": float(cfg.ray.cpus_per_worker),
                                                               **({"GPU": 1.0} if cfg.use_gpu else {})}),
            run_config=RunConfig(name="e2style_train", storage_path=os.path.join(cfg.output_dir, "ray_results")),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return [{"stage": k, "final": stage_paths(cfg, k)["final"], "metrics": result.metrics}
                for k in cfg.train.stages]
    finally:
        if started:
            ray.shutdown()
