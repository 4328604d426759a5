"""The inversion job's logic on the shard scheduler, without Ray: what one attempt at one shard is.

    prepare (a generator of chunk headers and chunks, one chunk at a time)
        -> chunks batched across shards onto the actor pool (``batch_size`` faces per call)
        -> finish (encode, Parquet + tar, commit with stats last)

``InversionJob`` is given its remote calls as functions and holds only their references and small headers,
never pixels; ``pipeline/inversion.py`` wires it to Ray. It imports neither Ray nor torch, so the scheduling
is unit-tested on a simulated cluster (tests/pipeline/test_scheduler.py).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from .progress import Progress
from .scheduler import ActorPool, Attempt, Scheduler

__all__ = ["InversionJob"]


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
        self.progress.drop(attempt.name)  # a retried shard's work in flight starts again from nothing
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
            self.progress.in_flight(attempt.name, n_inputs)
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
