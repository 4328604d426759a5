"""The shard scheduler: a queue of shard attempts driven over two plain functions, so that it runs (and is
unit-tested) without Ray. ``wait(refs, timeout)`` returns the refs that are ready (Ray: ``ray.wait``); the
job's ``start(attempt)`` submits the attempt's first work and ``watch``es what it returns; handlers submit and
watch the next steps, and ``commit`` or raise.

It owns what every job of shards needs: at most ``max_in_flight`` attempts at once (back-pressure: memory
stays flat on any input size), attempts counted per shard, a failing attempt retried ``retries`` times and
then reported, and results of an attempt that already failed (stale) dropped rather than mixed into the
next attempt. ``ActorPool`` spreads calls over long-lived workers with a bounded queue each.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

__all__ = ["Attempt", "Scheduler", "ActorPool", "short_error"]

log = logging.getLogger("e2style.scheduler")


def short_error(e: BaseException) -> str:
    """The line of an exception that says what went wrong (Ray wraps task errors with a traceback)."""
    msg = str(e).strip().splitlines()
    return (msg[-1] if msg else type(e).__name__)[:500]


@dataclass(eq=False)
class Attempt:
    shard: Any            # the job's shard (pipeline.read.Shard, a latents shard name, ...)
    name: str
    number: int           # 1 for the first attempt
    state: Any = None     # the job's own per-attempt state


@dataclass
class _Watch:
    handler: Callable[[Any], None]
    attempt: Attempt | None   # None: not tied to a shard attempt (an actor's call finishing); never stale
    what: str


class Scheduler:
    def __init__(self, wait: Callable[[list, float], list], *, retries: int, max_in_flight: int,
                 poll_s: float = 0.2, on_commit: Callable[[Attempt, Any], None] | None = None,
                 on_failed: Callable[[Attempt, str], None] | None = None,
                 on_idle: Callable[[], None] | None = None, on_round: Callable[[], None] | None = None):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._wait, self.retries, self.max_in_flight, self.poll_s = wait, retries, max_in_flight, poll_s
        self.on_commit, self.on_failed, self.on_idle, self.on_round = on_commit, on_failed, on_idle, on_round
        self.queue: collections.deque[Attempt] = collections.deque()
        self.active: dict[str, Attempt] = {}
        self.watching: dict[Hashable, list[_Watch]] = {}
        self.committed: list[tuple[str, Any]] = []   # (shard name, result) in commit order
        self.failed: dict[str, str] = {}             # shard name -> why its last attempt failed
        self.attempts: collections.Counter = collections.Counter()
        self.stale_dropped = 0
        self.peak_in_flight = 0

    # -- for the job's handlers -------------------------------------------------------------------------
    def watch(self, ref: Hashable, handler: Callable[[Any], None], attempt: Attempt | None = None,
              what: str = "") -> None:
        """Call ``handler(ref)`` once ``ref`` is ready. Tied to ``attempt``: dropped if that attempt is no longer
        current by then, and an exception from the handler fails the attempt (``what: reason``)."""
        self.watching.setdefault(ref, []).append(_Watch(handler, attempt, what))

    def is_current(self, attempt: Attempt) -> bool:
        return self.active.get(attempt.name) is attempt

    def commit(self, attempt: Attempt, result: Any) -> None:
        if not self.is_current(attempt):
            return
        del self.active[attempt.name]
        self.committed.append((attempt.name, result))
        if self.on_commit is not None:
            self.on_commit(attempt, result)

    def fail(self, attempt: Attempt, why: str) -> None:
        if not self.is_current(attempt):
            return
        del self.active[attempt.name]
        if attempt.number <= self.retries:
            log.warning("shard %s failed (attempt %d), retrying: %s", attempt.name, attempt.number, why)
            self.queue.appendleft(Attempt(attempt.shard, attempt.name, attempt.number + 1))
        else:
            log.error("shard %s failed after %d attempt(s): %s", attempt.name, attempt.number, why)
            self.failed[attempt.name] = why
            if self.on_failed is not None:
                self.on_failed(attempt, why)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, shards: Iterable[Any], start: Callable[[Attempt], None],
            name: Callable[[Any], str] = lambda s: s.name) -> None:
        """Until every shard is committed or has failed its last attempt."""
        self.queue.extend(Attempt(s, name(s), 1) for s in shards)
        while self.queue or self.active:
            while self.queue and len(self.active) < self.max_in_flight:
                a = self.queue.popleft()
                self.active[a.name] = a
                self.attempts[a.name] = a.number
                self.peak_in_flight = max(self.peak_in_flight, len(self.active))
                try:
                    start(a)
                except Exception as e:  # noqa: BLE001 - a shard that cannot start fails like any other
                    self.fail(a, f"start: {short_error(e)}")
            refs = list(self.watching)
            if not refs and self.active:
                raise RuntimeError(f"shard(s) {sorted(self.active)} in flight with nothing to wait for")
            ready = self._wait(refs, self.poll_s) if refs else []
            if not ready:
                if self.on_idle is not None:
                    self.on_idle()
                continue
            for ref in ready:
                for w in self.watching.pop(ref, []):
                    if w.attempt is not None and not self.is_current(w.attempt):
                        self.stale_dropped += 1
                        continue
                    try:
                        w.handler(ref)
                    except Exception as e:  # noqa: BLE001 - any failure fails the shard attempt
                        if w.attempt is None:
                            raise
                        self.fail(w.attempt, f"{w.what}: {short_error(e)}" if w.what else short_error(e))
            if self.on_round is not None:
                self.on_round()


class ActorPool:
    """Long-lived workers (the model loaded once in each), at most ``max_load`` outstanding calls each."""

    def __init__(self, actors: list, max_load: int):
        self.actors, self.max_load = list(actors), max_load
        self.load = [0] * len(self.actors)

    def has_free(self) -> bool:
        return min(self.load) < self.max_load

    def acquire(self) -> tuple[int, Any] | None:
        """(index, actor) of the least loaded actor with room, its load counted; None when all are full."""
        i = min(range(len(self.actors)), key=lambda k: self.load[k])
        if self.load[i] >= self.max_load:
            return None
        self.load[i] += 1
        return i, self.actors[i]

    def release(self, index: int) -> None:
        self.load[index] -= 1
