"""The output lease on the stores it covers, a local folder and S3 (moto's server on 127.0.0.1), without Ray:
one holder at a time, a refusal that names the holder, heartbeats, release (also on SIGTERM), the takeover of
a dead holder's lease by exactly one of the runs racing for it, and a heartbeat that never overwrites another
holder's lease."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from helpers.paths import REPO_ROOT
from pipeline.config import ConfigError
from pipeline.lease import HEARTBEATS_PER_STALE, LEASE_NAME, Holder, LeaseLostError, OutputLease, _machine, _pid_start
from pipeline.storage import get_fs

STALE_S = 300


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(fs, root, url) of an empty output on each covered store."""
    if request.param == "local":
        url = str(tmp_path / "out")
        fs, root = get_fs(url)
        return fs, root, url
    bucket = request.getfixturevalue("s3_bucket")
    url = f"s3://{bucket}/out"
    fs, root = get_fs(url, request.getfixturevalue("moto_server"))
    return fs, root, url


def lease_of(output, **kw) -> OutputLease:
    fs, root, url = output
    return OutputLease(fs, root, url, **{"stale_s": STALE_S, **kw})


def lease_exists(output) -> bool:
    fs, root, _ = output
    fs.invalidate_cache()
    return fs.exists(f"{root}/{LEASE_NAME}")


def dead_process() -> tuple[int, int | None]:
    """The pid of a process of this machine that has exited (and its start time while it ran)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = _pid_start(p.pid)
    p.kill()
    p.wait()
    return p.pid, start


def plant_dead_holder(output, run_id: str = "dead-run") -> Holder:
    """A lease left by a run whose process on this machine is gone (a SIGKILLed driver)."""
    pid, start = dead_process()
    holder = Holder(run_id, "this-host", pid, time.time() - 60, time.time() - 60, _machine(), start, "killed")
    assert lease_of(output).store.create(holder)
    return holder


def test_one_holder_at_a_time_and_the_refusal_names_it(output):
    first, second = lease_of(output), lease_of(output)
    assert first.acquire() is None and first.held
    t0 = time.monotonic()
    holder = second.acquire()
    assert time.monotonic() - t0 < 5 and not second.held
    assert holder.run_id == first.run_id and holder.pid == os.getpid() and holder.age_s < 30
    msg = second.refusal(holder)
    for part in (first.run_id, holder.host, f"pid {os.getpid()}", "started 20", "last heartbeat 20",
                 "output.lease_wait_s", "output.lease_stale_s"):
        assert part in msg, (part, msg)
    assert second.dead_because(holder) is None

    first.release()
    assert not lease_exists(output)
    assert second.acquire() is None
    assert second.peek().run_id == second.run_id
    second.release()


def test_a_waiting_run_gets_the_lease_when_the_holder_ends(output):
    first = lease_of(output)
    assert first.acquire() is None
    releaser = threading.Timer(1.5, first.release)
    releaser.start()
    waiting = lease_of(output, wait_s=60, stale_s=20)     # polls every second (stale_s / 20)
    t0 = time.monotonic()
    assert waiting.acquire() is None
    assert 1.0 < time.monotonic() - t0 < 30
    waiting.release()
    # A bounded wait on a holder that stays: refused once the wait is over.
    assert first.acquire() is None
    bounded = lease_of(output, wait_s=2, stale_s=20)
    t0 = time.monotonic()
    assert bounded.acquire().run_id == first.run_id
    assert 2.0 <= time.monotonic() - t0 < 10
    assert "after waiting 2 s" in bounded.refusal(first.peek())
    first.release()


def test_heartbeats_keep_the_lease_young(output):
    lease = lease_of(output, stale_s=HEARTBEATS_PER_STALE)  # a heartbeat every second
    assert lease.acquire() is None
    try:
        time.sleep(6)
        h = lease.peek()
        # Stores date to the second; without heartbeats the age would be 6 s.
        assert h.age_s < 4 and h.heartbeat_at > h.started_at + 2, h
    finally:
        lease.release()


def test_a_dead_holders_lease_is_taken_over_by_exactly_one_of_the_racers(output, caplog):
    for round_ in range(3):
        dead = plant_dead_holder(output, f"dead-{round_}")
        racers = [lease_of(output) for _ in range(6)]
        barrier = threading.Barrier(len(racers))
        results: dict[int, Holder | None] = {}

        def race(i: int) -> None:
            barrier.wait()
            results[i] = racers[i]._try()          # one attempt each, no heartbeat thread

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r is None]
        assert len(winners) == 1, results
        winner = racers[winners[0]]
        assert winner.peek().run_id == winner.run_id
        assert {r.run_id for r in results.values() if r is not None} == {winner.run_id}
        assert any("took over the stale lease" in r.message and dead.run_id in r.message
                   and "process" in r.message for r in caplog.records)
        winner._hold()                             # as acquire() goes on after its winning attempt
        winner.release()
        assert not lease_exists(output)


def test_a_lease_whose_heartbeat_stopped_is_stale_elsewhere(output):
    """A holder on another machine is judged by its heartbeat's age alone."""
    holder = Holder("far-run", "other-host", 1, time.time(), time.time(), "another-machine", 1, "")
    assert lease_of(output).store.create(holder)
    patient = lease_of(output, stale_s=2)
    assert patient.acquire().run_id == "far-run"   # young: refused
    time.sleep(3.5)
    assert patient.acquire() is None               # older than stale_s: taken over
    assert patient.peek().run_id == patient.run_id
    patient.release()


def test_a_heartbeat_never_overwrites_the_lease_of_the_run_that_took_over(output):
    """A holder that stalled past lease_stale_s and was taken over finds out at its next heartbeat, stops
    (SIGTERM to itself: LeaseLostError in the main thread), and leaves the new holder's lease alone."""
    handler_before = signal.getsignal(signal.SIGTERM)
    stalled = lease_of(output, stale_s=HEARTBEATS_PER_STALE)
    assert stalled.acquire() is None
    successor = lease_of(output)
    _, token = successor.store.read()
    assert successor.store.replace(successor._me(), token)   # what a takeover after the stall does
    with pytest.raises(LeaseLostError):
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.1)
    assert stalled.lost
    stalled.release()
    assert successor.peek().run_id == successor.run_id       # untouched by the stalled run's heartbeat or release
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_sigterm_releases_the_lease(tmp_path):
    """`ray job stop` and schedulers send SIGTERM before SIGKILL: the holder unwinds and releases."""
    url = str(tmp_path / "out")
    script = (f"import sys, time; sys.path.insert(0, {REPO_ROOT!r})\n"
              "from pipeline.lease import OutputLease\nfrom pipeline.storage import get_fs\n"
              f"fs, root = get_fs({url!r})\nlease = OutputLease(fs, root, {url!r}, stale_s=300)\n"
              "assert lease.acquire() is None\ntry:\n    print('held', flush=True)\n    time.sleep(60)\n"
              "finally:\n    lease.release()\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert os.path.exists(os.path.join(url, LEASE_NAME))
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
    assert not os.path.exists(os.path.join(url, LEASE_NAME))


def test_stores_without_an_exclusive_create_are_refused():
    fs = fsspec.filesystem("memory")
    with pytest.raises(ConfigError, match=r"output.url.*local paths and s3:// only.*memory"):
        OutputLease(fs, "/out", "memory://out", stale_s=STALE_S)


def test_a_file_in_the_leases_place_that_is_no_lease_is_named(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_bytes(b"\x00 not json")
    fs, root = get_fs(str(out))
    with pytest.raises(ConfigError, match=rf"output.url.*{LEASE_NAME} is not a lease this pipeline wrote"):
        OutputLease(fs, root, str(out), stale_s=STALE_S).acquire()
    assert (out / LEASE_NAME).read_bytes() == b"\x00 not json"
