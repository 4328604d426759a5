"""The inversion job on Ray: the Ray-free InversionJob (pipeline/inversion_job.py) wired to Ray's tasks and
actors (workers/).

    prepare_shard (CPU task, streaming generator: read -> decode -> align, one chunk at a time; with
        align.backend torch read -> decode only, and the actor aligns the chunk's photos)
        -> chunks batched across shards -> InvertWorker.invert_many (actor, one per GPU, model loaded once)
        -> finish_shard_task (CPU task: encode, Parquet + tar, commit with stats last)

The driver holds only object references and small headers, never pixels. Memory is bounded by
``ray.max_shards_in_flight`` (shards being prepared or waiting to be written) and by the outstanding calls
per actor, whatever the size of the input.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import ray

from workers.cpu_worker import finish_shard_task, prepare_shard_task
from workers.invert_worker import start_invert_actors, submit_invert

from .cluster import actor_plan, aligning_actor_cpus, cpus_per_gpu, wait_one
from .config import ConfigError, PipelineConfig
from .device_align import resolve_align_backend
from .inversion_job import InversionJob
from .inverter import aligning_actor_calls
from .progress import Progress
from .read import Shard
from .scheduler import ActorPool, Attempt, Scheduler, short_error

__all__ = ["run_inversion", "ACTOR_QUEUE", "ALIGN_PARTS_LINE"]

log = logging.getLogger("e2style.pipeline")

ACTOR_QUEUE = 2  # outstanding calls per inversion actor: one running, one queued so the device never idles


ALIGN_PARTS_LINE = "alignment on the actors, seconds by part: "


def _sum_align_parts(per_actor: list[dict[str, float]]) -> dict[str, float]:
    """Where the actors' alignment spent its time (seconds by part), summed over actors. Not rounded: a part
    that took under half a millisecond (the upload of a few small photos on a CPU actor) still shows it ran;
    the summary's line prints tenths."""
    total = collections.Counter()
    for parts in per_actor:
        total.update(parts)
    return dict(total)


def _relative_inputs(shard: Shard) -> list[str]:
    root = shard.root
    return [x[len(root) + 1:] if x.startswith(root + "/") else os.path.relpath(x, root) for x in shard.paths]


def run_inversion(cfg: PipelineConfig, todo: list[Shard], *, fingerprint: str, checkpoint_sha256: str,
                  stage_options: dict, known_total: int | None, echo
                  ) -> tuple[list[tuple[str, dict]], dict[str, str], float, dict[str, float]]:
    """Invert ``todo`` on the running Ray: ([(shard, stats)] committed, {shard: why} failed, seconds, the actors'
    alignment seconds by part ({} when they do not align))."""
    t0 = time.time()
    n_actors, actor_opts, n_gpus, n_cpus = actor_plan(cfg.ray)
    calls = ACTOR_QUEUE
    if n_gpus and cfg.align.enabled and resolve_align_backend(cfg.align.backend, "cuda") == "torch":
        # An actor that aligns: one call copies its photos while others align theirs (each on a stream of its
        # own) and one inverts; its host copies take CPUs of their own.
        actor_opts["num_cpus"] = aligning_actor_cpus(cpus_per_gpu())
        calls = aligning_actor_calls(cfg.align)
    m, ep = cfg.model, cfg.storage.endpoint_url
    actors = start_invert_actors(
        n_actors, actor_opts, calls, m.checkpoint, endpoint_url=ep, sha256=checkpoint_sha256,
        precision=m.precision, device=m.device, stages=m.stages, batch_size=m.batch_size, num_threads=m.num_threads,
        compile=m.compile, return_images=cfg.output.image_size > 0, edit_options=stage_options.get("edit"),
        task=stage_options.get("task"), align=cfg.align if cfg.align.enabled else None)
    try:
        try:
            info = ray.get(actors[0].info.remote())
        except Exception as e:  # noqa: BLE001 - surfaces as a config error naming the key
            raise ConfigError("model.checkpoint", f"cannot load the model: {short_error(e)}") from None
        steps = ", ".join(f"{k} {v:.1f}" for k, v in info["init_seconds"].items())
        echo(f"model: n_latent={info['n_latent']} stages={info['stages']}/{info['num_stages']} "
             f"resolution={info['resolution']} device={info['device']}; {n_actors} inversion actor(s), "
             f"{n_cpus} CPUs; actor started in {time.time() - t0:.0f} s ({steps})"
             + ("; inversion as a CUDA graph" if info.get("cuda_graph") else ""))
        cpu_for_tasks = max(1, n_cpus - (0 if n_gpus else n_actors))
        metadata = {"fingerprint": fingerprint, "checkpoint_sha256": checkpoint_sha256,
                    "stages": str(info["stages"]), "style_dim": str(info["style_dim"])}
        # align.backend as the actors resolved it (auto: torch on GPU actors): with torch, CPU tasks only read
        # and decode, and the actors align. All actors are of one kind, so the first one's answer holds.
        prepare_cfg = cfg.prepare
        if info["align_backend"] is not None:
            prepare_cfg = dataclasses.replace(prepare_cfg, align=dataclasses.replace(cfg.align, backend=info["align_backend"]))
            where = "on the inversion actors" if info["align_backend"] == "torch" else "in CPU tasks"
            echo(f"alignment: {info['align_backend']} ({where})")

        def submit_finish(attempt: Attempt, chunks: list, results: list):
            shard: Shard = attempt.shard
            extra = {"format": shard.format, "input": shard.uri, "fingerprint": fingerprint,
                     "attempt": attempt.number, "n_latent": info["n_latent"]}
            if shard.format == "images":
                extra["inputs"] = _relative_inputs(shard)
            return finish_shard_task.remote(shard.name, cfg.output, ep, cfg.input.max_pixels, info["n_latent"], extra,
                                            metadata, len(chunks), *chunks, *results)

        prog = Progress(cfg.progress, known_total, len(todo), cfg.progress_interval_s)

        def on_commit(attempt: Attempt, stats: dict) -> None:
            bad = {k: v for k, v in stats["counts"].items() if k != "ok"}
            log.info("committed shard %s: %d rows%s", attempt.name, stats["rows"], f" ({bad})" if bad else "")
            prog.commit(stats.get("inputs_read", 0), attempt.name)

        def on_round() -> None:
            job.submit_batches(flush=job.reading_done())
            prog.tick()

        def on_idle() -> None:
            job.submit_batches(flush=True)   # nothing new soon: send partial batches rather than idle
            prog.tick()

        sched = Scheduler(wait_one, retries=cfg.retries, max_in_flight=cfg.ray.max_shards_in_flight or cpu_for_tasks + 1,
                          on_commit=on_commit, on_failed=lambda a, why: prog.drop(a.name, failed=True),
                          on_idle=on_idle, on_round=on_round)
        job = InversionJob(sched, ActorPool(actors, calls),
                           submit_prepare=lambda shard: prepare_shard_task.remote(shard, prepare_cfg),
                           submit_invert=submit_invert, submit_finish=submit_finish, get=ray.get,
                           batch_size=info["batch_size"], progress=prog)
        try:
            sched.run(todo, job.start)
        finally:
            processing_s = prog.close()  # the summary's throughput is over the progress's own time: one figure
        align_parts: dict[str, float] = {}
        if info["align_backend"] == "torch":
            try:  # a report only: an actor lost at the end costs the line, not the run
                align_parts = _sum_align_parts(ray.get([a.align_part_seconds.remote() for a in actors], timeout=60))
                echo(ALIGN_PARTS_LINE + ", ".join(f"{k} {v:.1f}" for k, v in align_parts.items()))
            except Exception as e:  # noqa: BLE001
                log.warning("alignment time by part not reported: %s", short_error(e))
        return sched.committed, sched.failed, processing_s, align_parts
    finally:
        for a in actors:
            ray.kill(a)
