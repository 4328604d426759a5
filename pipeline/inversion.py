"""The inversion job on the shard scheduler: what one attempt at one shard is, on Ray.

    prepare_shard (CPU task, streaming generator: read -> decode -> align, one chunk at a time; with
        align.backend torch read -> decode only, and the actor aligns the chunk's photos)
        -> chunks batched across shards -> InvertWorker.invert_many (actor, one per GPU, model loaded once)
        -> finish_shard_task (CPU task: encode, Parquet + tar, commit with stats last)

The driver holds only object references and small headers, never pixels. Memory is bounded by
``ray.max_shards_in_flight`` (shards being prepared or waiting to be written) and by two outstanding calls
per actor, whatever the size of the input. ``InversionJob`` is given its Ray calls as functions, so it
depends on the scheduler and nothing of Ray's; ``run_inversion`` wires it to Ray.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from workers.cpu_worker import finish_shard_task, prepare_shard
from workers.invert_worker import ALIGN_LANES_LARGE_GPU, InvertWorker

from .cluster import actor_plan, cpus_per_gpu, wait_one
from .config import AlignConfig, ConfigError, PipelineConfig
from .device_align import resolve_align_backend
from .progress import Progress
from .read import Shard
from .scheduler import ActorPool, Attempt, Scheduler, short_error

__all__ = ["InversionJob", "run_inversion", "ACTOR_QUEUE", "aligning_actor_calls", "ALIGN_PARTS_LINE"]

log = logging.getLogger("e2style.pipeline")

ACTOR_QUEUE = 2  # outstanding calls per inversion actor: one running, one queued so the device never idles


def aligning_actor_calls(align: AlignConfig) -> int:
    """Calls at once in an inversion actor that aligns photos on its GPU: one per step of
    InvertWorker.invert_chunks (the photos' host copy into pinned memory, alignment, inversion), with alignment
    taken by as many calls as the actor has alignment lanes: align.device_lanes, or by default as many as an
    actor may choose (workers.invert_worker.aligning_lanes: fewer on a smaller GPU, whose extra calls wait
    for a lane with their photos staged)."""
    return (align.device_lanes or ALIGN_LANES_LARGE_GPU) + 2


# CPUs of a GPU actor that aligns photos (align.backend torch): its host steps are on alignment's serial path,
# above all the copy of each chunk's photos into pinned memory (~400 MB per 64 photos of 2 MP), which torch
# spreads over the actor's threads, and Ray gives an actor as many threads (OMP_NUM_THREADS) as CPUs.
ALIGNING_ACTOR_CPUS = 4


def aligning_actor_cpus(cpus_per_gpu: int) -> int:
    """CPUs for each GPU actor that aligns, given the fewest CPUs per GPU of the GPU nodes: ALIGNING_ACTOR_CPUS
    where they have at least twice that (the rest read and decode), at most half of them on smaller nodes (so
    the actor fits on every GPU node), never below one."""
    return max(1, min(ALIGNING_ACTOR_CPUS, cpus_per_gpu // 2))


@dataclass
class _ShardState:
    gen: Any                                            # the prepare task's chunk generator
    chunks: list = field(default_factory=list)          # chunk refs in order
    results: dict = field(default_factory=dict)         # chunk index -> inversion result ref (None: no faces)
    reading_done: bool = False
    finishing: bool = False


@dataclass
class _Pending:
    attempt: Attempt
    index: int          # the chunk's index in its shard
    chunk: Any          # its ref
    n_faces: int


class InversionJob:
    """Per shard attempt: chunks from ``submit_prepare(shard)`` (a generator of header ref, chunk ref, ...), their
    faces batched across shards (``batch_size``) onto the actor pool with ``submit_invert(actor, chunk refs)``
    (one result ref per chunk), then ``submit_finish(attempt, chunk refs, result refs)`` whose result (the
    shard's stats) commits it."""

    def __init__(self, sched: Scheduler, pool: ActorPool, *, submit_prepare: Callable[[Any], Any],
                 submit_invert: Callable[[Any, list], list], submit_finish: Callable[[Attempt, list, list], Any],
                 get: Callable[[Any], Any], batch_size: int, progress: Progress):
        self.sched, self.pool, self.get, self.batch_size, self.progress = sched, pool, get, batch_size, progress
        self.submit_prepare, self.submit_invert, self.submit_finish = submit_prepare, submit_invert, submit_finish
        self.pending: collections.deque[_Pending] = collections.deque()

    def start(self, attempt: Attempt) -> None:
        attempt.state = _ShardState(self.submit_prepare(attempt.shard))
        self.sched.watch(attempt.state.gen, self._on_chunk(attempt), attempt, "prepare")

    def _on_chunk(self, attempt: Attempt) -> Callable[[Any], None]:
        def handler(gen) -> None:
            st = attempt.state
            try:
                header = next(gen)
            except StopIteration:
                st.reading_done = True
                self._maybe_finish(attempt)
                return
            n_faces, _n_rows, n_inputs = self.get(header)
            chunk = next(gen)
            index = len(st.chunks)
            st.chunks.append(chunk)
            self.progress.add_images(n_inputs)
            if n_faces:
                self.pending.append(_Pending(attempt, index, chunk, n_faces))
            else:
                st.results[index] = None
            self.sched.watch(gen, handler, attempt, "prepare")  # the next chunk
        return handler

    def _maybe_finish(self, attempt: Attempt) -> None:
        st = attempt.state
        if st.finishing or not st.reading_done or len(st.results) < len(st.chunks):
            return
        st.finishing = True
        ref = self.submit_finish(attempt, st.chunks, [st.results[i] for i in range(len(st.chunks))])
        self.sched.watch(ref, lambda r: self.sched.commit(attempt, self.get(r)), attempt, "invert/write")

    def submit_batches(self, flush: bool) -> None:
        """Send full batches of faces to actors with room; partial ones too when ``flush``."""
        # The chunks of an attempt that failed meanwhile are not inverted.
        self.pending = collections.deque(p for p in self.pending if self.sched.is_current(p.attempt))
        while self.pending and self.pool.has_free():
            if sum(p.n_faces for p in self.pending) < self.batch_size and not flush:
                return
            take, n = [], 0
            while self.pending and (n < self.batch_size or not take):
                take.append(self.pending.popleft())
                n += take[-1].n_faces
            index, actor = self.pool.acquire()
            refs = self.submit_invert(actor, [p.chunk for p in take])
            self.sched.watch(refs[-1], lambda r, i=index: self.pool.release(i))
            for p, r in zip(take, refs):
                p.attempt.state.results[p.index] = r
            for p in take:
                self._maybe_finish(p.attempt)

    def reading_done(self) -> bool:
        return all(a.state is not None and a.state.reading_done for a in self.sched.active.values())


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
        actor_opts["num_cpus"] = aligning_actor_cpus(cpus_per_gpu())
        calls = aligning_actor_calls(cfg.align)
    # A crashed actor (OOM, driver-level CUDA error, its node lost) is restarted, and the calls sent while it
    # restarts are retried by Ray (max_task_retries: invert_many is a pure function of its inputs; bounded, so a
    # batch that kills the actor every time still ends the shard's attempt); shards that still fail are retried.
    # max_concurrency: while one call's batches run on the GPU, the next call's inputs are unpacked, pinned and
    # copied; in an actor that aligns, one call copies its photos while two align theirs (each on a stream of its
    # own) and one inverts.
    Actor = ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=calls)(InvertWorker)
    m, ep = cfg.model, cfg.storage.endpoint_url
    actors = [Actor.options(**actor_opts).remote(
        m.checkpoint, endpoint_url=ep, sha256=checkpoint_sha256, precision=m.precision, device=m.device,
        stages=m.stages, batch_size=m.batch_size, num_threads=m.num_threads, compile=m.compile,
        return_images=cfg.output.image_size > 0, edit_options=stage_options.get("edit"), task=stage_options.get("task"),
        align=cfg.align if cfg.align.enabled else None)
        for _ in range(n_actors)]
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
        prep = ray.remote(num_cpus=1, max_retries=0)(prepare_shard)
        fin = ray.remote(num_cpus=1, max_retries=0)(finish_shard_task)
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
            return fin.remote(shard.name, cfg.output, ep, cfg.input.max_pixels, info["n_latent"], extra, metadata,
                              len(chunks), *chunks, *results)

        def submit_invert(actor, chunks: list) -> list:
            refs = actor.invert_many.options(num_returns=len(chunks)).remote(*chunks)
            return refs if isinstance(refs, list) else [refs]

        prog = Progress(cfg.progress, known_total, len(todo), cfg.progress_interval_s)

        def on_commit(attempt: Attempt, stats: dict) -> None:
            bad = {k: v for k, v in stats["counts"].items() if k != "ok"}
            log.info("committed shard %s: %d rows%s", attempt.name, stats["rows"], f" ({bad})" if bad else "")
            prog.shard_done()

        def on_round() -> None:
            job.submit_batches(flush=job.reading_done())
            prog.tick()

        def on_idle() -> None:
            job.submit_batches(flush=True)   # nothing new soon: send partial batches rather than idle
            prog.tick()

        sched = Scheduler(wait_one, retries=cfg.retries, max_in_flight=cfg.ray.max_shards_in_flight or cpu_for_tasks + 1,
                          on_commit=on_commit, on_failed=lambda a, why: prog.shard_done(failed=True),
                          on_idle=on_idle, on_round=on_round)
        job = InversionJob(sched, ActorPool(actors, calls), submit_prepare=lambda s: prep.remote(s, prepare_cfg),
                           submit_invert=submit_invert, submit_finish=submit_finish, get=ray.get,
                           batch_size=info["batch_size"], progress=prog)
        try:
            sched.run(todo, job.start)
        finally:
            prog.close()
        align_parts: dict[str, float] = {}
        if info["align_backend"] == "torch":
            try:  # a report only: an actor lost at the end costs the line, not the run
                align_parts = _sum_align_parts(ray.get([a.align_part_seconds.remote() for a in actors], timeout=60))
                echo(ALIGN_PARTS_LINE + ", ".join(f"{k} {v:.1f}" for k, v in align_parts.items()))
            except Exception as e:  # noqa: BLE001
                log.warning("alignment time by part not reported: %s", short_error(e))
        return sched.committed, sched.failed, time.time() - t0, align_parts
    finally:
        for a in actors:
            ray.kill(a)
