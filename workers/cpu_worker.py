"""The inversion job's CPU tasks on Ray, each with its resource options in one place: prepare (read, decode,
align) and finish (encode, write, commit) one shard.

Their bodies are ``pipeline.prepare.prepare_shard`` and ``pipeline.write.finish_shard``. Alignment's dlib models
are cached per worker process by ``pipeline.align.get_aligner``, and Ray reuses task worker processes, so the
1.7 s predictor load is paid once per worker, not per shard or per image. ``max_retries=0``: the shard
scheduler (pipeline/scheduler.py) retries a failed shard as a new attempt.
"""
from __future__ import annotations

import ray

from pipeline.config import OutputConfig
from pipeline.prepare import prepare_shard
from pipeline.records import InvertResult, PreparedChunk
from pipeline.storage import get_fs
from pipeline.write import finish_shard

__all__ = ["prepare_shard_task", "finish_shard_task"]

# A streaming generator task: yields a ChunkHeader then the PreparedChunk, for each chunk of the shard.
prepare_shard_task = ray.remote(num_cpus=1, max_retries=0)(prepare_shard)


@ray.remote(num_cpus=1, max_retries=0)
def finish_shard_task(shard_name: str, output: OutputConfig, endpoint_url: str | None, max_pixels: int | None,
                      n_latent: int, stats_extra: dict, metadata: dict, n_chunks: int, *chunks_and_results) -> dict:
    """Args after ``n_chunks``: the chunks, then one InvertResult (or None) per chunk, passed as refs at the top
    level so that Ray resolves them before the task runs."""
    chunks: list[PreparedChunk] = list(chunks_and_results[:n_chunks])
    results: list[InvertResult | None] = list(chunks_and_results[n_chunks:])
    fs, root = get_fs(output.url, endpoint_url)
    return finish_shard(fs, root, shard_name, output, chunks, results, n_latent=n_latent,
                        stats_extra=stats_extra, metadata=metadata, max_pixels=max_pixels)
