"""The latents subcommands' actor: the generator loaded once in ``__init__``, one call per shard.

A thin wrapper over ``pipeline.latents_ops.process_shard``; usable without Ray."""
from __future__ import annotations

import os

import torch

from models import load_e2style
from pipeline.checkpoints import fetch_checkpoint, resolve_batch_size, resolve_device
from pipeline.latents_ops import LatentsJob, process_shard

__all__ = ["LatentsWorker"]


class LatentsWorker:
    def __init__(self, checkpoint: str, *, endpoint_url: str | None = None, sha256: str | None = None,
                 precision: str = "auto", device: str = "auto", num_threads: int | None = None, batch_size: int | str = "auto"):
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        elif self.device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            # Ray sets OMP_NUM_THREADS to the actor's CPU share; keep torch's intra-op pool to it.
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        precision = ("fp16" if self.device.startswith("cuda") else "fp32") if precision == "auto" else precision
        self.model = load_e2style(fetch_checkpoint(checkpoint, endpoint_url, sha256), device=self.device, precision=precision)
        self.batch_size = resolve_batch_size(batch_size, self.device)

    def info(self) -> dict:
        return {"n_latent": int(self.model.n_latent), "style_dim": int(self.model.decoder.style_dim), "device": self.device}

    def process(self, shard: str, job: LatentsJob) -> dict:
        return process_shard(self.model, shard, job, self.batch_size)
