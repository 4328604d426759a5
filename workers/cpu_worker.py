"""CPU work as Ray tasks: prepare (read, decode, align) and finish (encode, write, commit) one shard.

Thin wrappers over ``pipeline.prepare`` and ``pipeline.write``, each given the config it uses. Alignment's
dlib models are cached per worker process by ``pipeline.align.get_aligner``, and Ray reuses task worker
processes, so the 1.7 s predictor load is paid once per worker, not per shard or per image.
"""
from __future__ import annotations

import os
from typing import Iterator

from pipeline.config import OutputConfig, PrepareConfig
from pipeline.prepare import prepare_chunks
from pipeline.read import Shard
from pipeline.records import InvertResult, PreparedChunk
from pipeline.storage import get_fs
from pipeline.write import finish_shard

__all__ = ["ChunkHeader", "prepare_shard", "finish_shard_task", "lower_priority"]


class ChunkHeader(tuple):
    """(n_faces, n_rows, n_inputs): what the driver needs to batch a chunk without fetching its pixels. With
    align.backend torch, n_faces counts the chunk's photos (the actor aligns them): batches count photos."""


def prepare_shard(shard: Shard, cfg: PrepareConfig) -> Iterator:
    """A streaming generator: yields a ChunkHeader then the PreparedChunk, for each chunk of the shard."""
    if cfg.align.enabled and cfg.align.backend == "torch":
        # The actors align: on a node they share, their host steps come first (ray.cpu_task_niceness).
        lower_priority(cfg.niceness)
    fs, _ = get_fs(cfg.input.url, cfg.endpoint_url)
    for chunk in prepare_chunks(fs, shard, cfg):
        yield ChunkHeader((chunk.n_faces + chunk.n_photos, len(chunk.rows), chunk.n_inputs))
        yield chunk


def lower_priority(niceness: int) -> None:
    """Raise this process's niceness to ``niceness``. Never lowers it (that needs privileges): a Ray worker
    process keeps it for the later tasks it runs, all of them throughput work."""
    current = os.nice(0)
    if niceness > current:
        os.nice(niceness - current)


def finish_shard_task(shard_name: str, output: OutputConfig, endpoint_url: str | None, max_pixels: int | None,
                      n_latent: int, stats_extra: dict, metadata: dict, n_chunks: int, *chunks_and_results) -> dict:
    """Args after ``n_chunks``: the chunks, then one InvertResult (or None) per chunk (Ray resolves them)."""
    chunks: list[PreparedChunk] = list(chunks_and_results[:n_chunks])
    results: list[InvertResult | None] = list(chunks_and_results[n_chunks:])
    fs, root = get_fs(output.url, endpoint_url)
    return finish_shard(fs, root, shard_name, output, chunks, results, n_latent=n_latent,
                        stats_extra=stats_extra, metadata=metadata, max_pixels=max_pixels)
