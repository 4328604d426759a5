"""The shard scheduler, the actor pool, the inversion job's batching and the progress log, without Ray: a
small simulated cluster gives refs that become ready when the test says, so retries, stale results and
back-pressure are counted exactly."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from helpers.paths import REPO_ROOT
from pipeline.inversion_job import InversionJob
from pipeline.progress import Progress
from pipeline.scheduler import ActorPool, Attempt, Scheduler


class SimCluster:
    """Work submitted now finishes ``delay`` waits later, with a value or an exception. ``wait`` returns one
    ready ref (the earliest finished), like ``ray.wait(num_returns=1)``."""

    def __init__(self):
        self.clock = 0
        self.done_at: dict[int, int] = {}
        self.values: dict[int, object] = {}
        self._ids = itertools.count()

    def submit(self, value, delay: int = 1) -> int:
        ref = next(self._ids)
        self.done_at[ref] = self.clock + delay
        self.values[ref] = value
        return ref

    def generator(self, refs: list) -> "SimGenerator":
        return SimGenerator(self, refs)

    def _done_at(self, ref) -> int:
        return ref.done_at() if isinstance(ref, SimGenerator) else self.done_at[ref]

    def wait(self, refs: list, timeout: float) -> list:
        self.clock += 1
        ready = sorted((r for r in refs if self._done_at(r) <= self.clock), key=lambda r: self._done_at(r))
        return ready[:1]

    def get(self, ref):
        v = self.values[ref]
        if isinstance(v, Exception):
            raise v
        return v


class SimGenerator:
    """Like Ray's streaming generator: waitable (ready when its next ref is, or when exhausted), ``next`` gives
    the refs in order."""

    def __init__(self, sim: SimCluster, refs: list):
        self.sim, self.refs = sim, list(refs)

    def done_at(self) -> int:
        return self.sim.done_at[self.refs[0]] if self.refs else 0

    def __next__(self):
        if not self.refs:
            raise StopIteration
        return self.refs.pop(0)


def _one_call_job(sim: SimCluster, sched: Scheduler, outcome, delay=lambda a: 1):
    """start(): one call per attempt whose result commits it; ``outcome(attempt)`` is its value or exception."""
    def start(a: Attempt) -> None:
        ref = sim.submit(outcome(a), delay(a))
        sched.watch(ref, lambda r: sched.commit(a, sim.get(r)), a, "work")
    return start


def test_failing_shard_is_retried_then_reported_and_attempts_are_counted():
    sim = SimCluster()
    sched = Scheduler(sim.wait, retries=2, max_in_flight=4)
    tried: list[tuple[str, int]] = []

    def outcome(a):
        tried.append((a.name, a.number))
        if a.name == "bad" or (a.name == "flaky" and a.number == 1):
            return RuntimeError(f"boom {a.name} {a.number}\nValueError: the last line says why")
        return {"shard": a.name}

    sched.run(["good", "bad", "flaky"], _one_call_job(sim, sched, outcome), name=str)
    assert sorted(tried) == [("bad", 1), ("bad", 2), ("bad", 3), ("flaky", 1), ("flaky", 2), ("good", 1)]
    assert dict(sched.attempts) == {"good": 1, "bad": 3, "flaky": 2}
    assert sched.failed == {"bad": "work: ValueError: the last line says why"}
    assert sorted(n for n, _ in sched.committed) == ["flaky", "good"]
    assert dict(sched.committed)["flaky"] == {"shard": "flaky"}


def test_zero_retries_reports_at_once():
    sim = SimCluster()
    sched = Scheduler(sim.wait, retries=0, max_in_flight=1)
    sched.run(["a"], _one_call_job(sim, sched, lambda a: OSError("gone")), name=str)
    assert sched.attempts["a"] == 1 and sched.failed == {"a": "work: gone"} and sched.committed == []


def test_stale_result_of_a_failed_attempt_is_dropped():
    """Attempt 1 of a shard has two pieces of work: one fails fast, the other finishes late. Its late result
    must not commit the shard: attempt 2's does, and the stale one is counted as dropped."""
    sim = SimCluster()
    sched = Scheduler(sim.wait, retries=1, max_in_flight=2)

    def start(a: Attempt) -> None:
        if a.number == 1:
            fast = sim.submit(RuntimeError("piece failed"), delay=1)
            slow = sim.submit("stale result", delay=4)
            sched.watch(fast, lambda r: sim.get(r), a, "piece")
            sched.watch(slow, lambda r: sched.commit(a, sim.get(r)), a, "piece")
        else:
            ref = sim.submit("fresh result", delay=6)  # finishes after attempt 1's slow piece
            sched.watch(ref, lambda r: sched.commit(a, sim.get(r)), a, "piece")

    sched.run(["s"], start, name=str)
    assert sched.committed == [("s", "fresh result")]
    assert sched.stale_dropped == 1 and sched.attempts["s"] == 2 and not sched.failed


def test_back_pressure_bounds_the_shards_in_flight():
    sim = SimCluster()
    sched = Scheduler(sim.wait, retries=0, max_in_flight=3)
    seen = []

    def start(a: Attempt) -> None:
        seen.append(len(sched.active))
        ref = sim.submit(a.name, delay=3)
        sched.watch(ref, lambda r: sched.commit(a, sim.get(r)), a)

    shards = [f"s{i}" for i in range(10)]
    sched.run(shards, start, name=str)
    assert max(seen) == 3 and sched.peak_in_flight == 3
    assert sorted(n for n, _ in sched.committed) == shards


def test_a_shard_that_cannot_start_fails_like_any_other():
    sim = SimCluster()
    sched = Scheduler(sim.wait, retries=1, max_in_flight=2)

    def start(a: Attempt) -> None:
        if a.name == "x":
            raise FileNotFoundError("no such input")
        ref = sim.submit("ok")
        sched.watch(ref, lambda r: sched.commit(a, sim.get(r)), a)

    sched.run(["x", "y"], start, name=str)
    assert sched.failed == {"x": "start: no such input"} and sched.attempts["x"] == 2
    assert sched.committed == [("y", "ok")]


def test_actor_pool_least_loaded_and_bounded():
    pool = ActorPool(["a", "b"], max_load=2)
    got = [pool.acquire() for _ in range(4)]
    assert sorted(a for _, a in got) == ["a", "a", "b", "b"] and pool.load == [2, 2]
    assert pool.acquire() is None and not pool.has_free()
    pool.release(1)
    assert pool.acquire() == (1, "b")


def test_inversion_job_batches_across_shards_and_commits_each_shard_once():
    """The inversion job on the scheduler: chunks of two shards share batches of ``batch_size`` faces on
    a pool of actors with a bounded queue; a chunk without faces is not sent; each shard is finished with
    its own chunks' results, in chunk order."""
    sim = SimCluster()
    calls: list[list[str]] = []
    finished: dict[str, tuple[list, list]] = {}

    def submit_prepare(shard):
        items = []
        for i, n_faces in enumerate(shard["chunks"]):
            items += [sim.submit((n_faces, n_faces, 1)), sim.submit(f"{shard['name']}/c{i}")]
        return sim.generator(items)

    def submit_invert(actor, chunks):
        names = [sim.get(c) for c in chunks]
        calls.append(names)
        return [sim.submit(f"inv({n})", delay=2) for n in names]

    def submit_finish(attempt, chunks, results):
        finished[attempt.name] = ([sim.get(c) for c in chunks], [None if r is None else sim.get(r) for r in results])
        return sim.submit({"rows": len(chunks)})

    prog = Progress(False, None, 2, interval_s=0)
    sched = Scheduler(sim.wait, retries=0, max_in_flight=2)
    job = InversionJob(sched, ActorPool(["gpu0"], 2), submit_prepare=submit_prepare, submit_invert=submit_invert,
                       submit_finish=submit_finish, get=sim.get, batch_size=4, progress=prog)
    sched.on_round = lambda: job.submit_batches(flush=job.reading_done())
    sched.on_idle = lambda: job.submit_batches(flush=True)
    shards = [{"name": "A", "chunks": [3, 0, 2]}, {"name": "B", "chunks": [1, 3]}]
    sched.run(shards, job.start, name=lambda s: s["name"])
    assert sorted(n for n, _ in sched.committed) == ["A", "B"] and not sched.failed
    assert sorted(c for call in calls for c in call) == ["A/c0", "A/c2", "B/c0", "B/c1"]  # A/c1 has no faces
    assert any({c[0] for c in call} == {"A", "B"} for call in calls)  # a batch holds both shards' chunks
    assert finished["A"] == (["A/c0", "A/c1", "A/c2"], ["inv(A/c0)", None, "inv(A/c2)"])
    assert finished["B"] == (["B/c0", "B/c1"], ["inv(B/c0)", "inv(B/c1)"])
    assert prog.in_flight_total == 5 and prog.committed == 0  # read; commits are on_commit's (not set here)


def test_scheduler_rejects_a_job_that_waits_on_nothing():
    sched = Scheduler(lambda refs, t: [], retries=0, max_in_flight=1)
    with pytest.raises(RuntimeError, match="nothing to wait for"):
        sched.run(["a"], lambda a: None, name=str)


def test_the_inversion_job_imports_neither_ray_nor_torch_nor_workers():
    """InversionJob is the inversion job's logic without Ray: importing it (in a fresh interpreter) loads none of
    Ray, torch or workers/, so these tests run it on the simulated cluster alone."""
    code = ("import sys, pipeline.inversion_job; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'workers'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
