"""One writer per output, end to end on a local folder and on S3 (moto's server), for the inversion job and
the decode subcommand, with the CLI as a scheduler runs it and a real Ray (the test session's, joined):

1. a second run while the first writes is refused within seconds (exit 2, the holder named), writes nothing,
   and ``--dry-run`` reports the live lease; the first run then finishes: every input exactly once, ``_SUCCESS``;
2. a SIGKILLed holder's lease is taken over, and of two runs racing for it exactly one proceeds.

The first run is held still from the test side while the second one tries (SIGSTOP, then SIGCONT): its
process is alive and its lease live, whatever the machine's speed. The inversion runs are stopped (or killed)
once a shard is committed, the quicker decode runs once their lease is there.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass

import fsspec
import pandas as pd
import pytest
import yaml

from helpers.inputs import tiny_image_bytes
from helpers.paths import REPO_ROOT
from pipeline.config import resolve
from pipeline.lease import LEASE_NAME, OutputLease
from pipeline.runner import run

N_IMAGES, SHARD_SIZE = 12, 2
N_SHARDS = N_IMAGES // SHARD_SIZE
RUN_TIMEOUT_S = 240

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


@dataclass
class Place:
    """A store for a test's input and outputs: ``url`` for configs, ``path`` for ``fs``."""
    fs: fsspec.AbstractFileSystem
    base_url: str
    base_path: str
    endpoint: str | None

    def url(self, rel: str) -> str:
        return f"{self.base_url}/{rel}"

    def path(self, rel: str) -> str:
        return f"{self.base_path}/{rel}"

    def files(self, rel: str, pattern: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self.path(f"{rel}/{pattern}")))

    def committed(self, rel: str) -> list[str]:
        return self.files(rel, "stats/*.json")

    def final_files(self, rel: str) -> set[str]:
        """The shard files under their final names (temporaries come and go while a run writes)."""
        return {f"{sub}/{n}" for sub, pat in (("stats", "*.json"), ("latents", "*.parquet"), ("images", "*.tar"))
                for n in self.files(rel, f"{sub}/{pat}")}

    def holder(self, rel: str):
        fs, root = self.fs, self.path(rel)
        return OutputLease(fs, root, self.url(rel), stale_s=300).peek()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place(fsspec.filesystem("file"), str(tmp_path), str(tmp_path), None)
    bucket = request.getfixturevalue("s3_bucket")
    return Place(request.getfixturevalue("s3fs_session"), f"s3://{bucket}", bucket,
                 request.getfixturevalue("moto_server"))


@pytest.fixture
def photos(place) -> set[str]:
    keys = {f"img{i:03d}" for i in range(N_IMAGES)}
    if place.endpoint is None:
        place.fs.makedirs(place.path("in"), exist_ok=True)
    for i, k in enumerate(sorted(keys)):
        place.fs.pipe_file(place.path(f"in/{k}.jpg"), tiny_image_bytes(i))
    return keys


def config(place: Place, ray_session, checkpoint: str, out_url: str | None = None) -> dict:
    return {"input": {"url": place.url("in")}, "output": {"url": out_url or place.url("out")},
            "model": {"checkpoint": checkpoint, "batch_size": 2}, "align": {"enabled": False},
            "storage": {"endpoint_url": place.endpoint}, "shard_size": SHARD_SIZE, "progress": False,
            # Join the test session's Ray: no second Ray on a small CI machine.
            "ray": {"address": ray_session.get_runtime_context().gcs_address, "chunk_size": 1,
                    "max_shards_in_flight": 1}}


def start(args: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), *args], cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(what: str, predicate, proc: subprocess.Popen, log_path, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not seen (run exited {proc.poll()})\n{open(log_path).read()[-4000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log_path) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, open(log_path).read()


def assert_complete_once(place: Place, out: str, keys: set[str], member: str, n_shards: int) -> None:
    """Every input exactly once in latents and images, every shard committed, _SUCCESS, no lease left."""
    fs = place.fs
    committed = place.committed(out)
    assert len(committed) == n_shards
    latents = place.files(out, "latents/*.parquet")
    assert [n[: -len(".parquet")] for n in latents] == [n[: -len(".json")] for n in committed]
    df = pd.concat([pd.read_parquet(fs.open(place.path(f"{out}/latents/{n}"))) for n in latents], ignore_index=True)
    assert sorted(df.key) == sorted(keys) and (df.status == "ok").all()
    names = []
    for n in place.files(out, "images/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(place.path(f"{out}/images/{n}")))) as tf:
            names += tf.getnames()
    assert sorted(names) == sorted(f"{k}.{member}" for k in keys)
    assert fs.exists(place.path(f"{out}/_SUCCESS"))
    assert not fs.exists(place.path(f"{out}/{LEASE_NAME}"))


def refusal_names(holder, text: str) -> None:
    assert "refused: output" in text, text[-3000:]
    for part in (f"run {holder.run_id}", f"host {holder.host}", f"pid {holder.pid}", "started 20",
                 "last heartbeat 20", "output.lease_wait_s"):
        assert part in text, (part, text[-3000:])


def started_writing(place: Place, out: str, trigger: str):
    """What the test waits for before it stops or kills the first run: a committed shard, or its lease."""
    if trigger == "commit":
        return "the first run's first committed shard", lambda: place.committed(out)
    return "the first run's lease", lambda: place.holder(out) is not None


def overlap_then_finish(place, tmp_path, first_args, second, dry_run, out, keys, member, n_shards,
                        trigger) -> None:
    """The first run (CLI) is held still once it writes; ``second()`` and ``dry_run()`` run meanwhile."""
    log1 = tmp_path / "first.log"
    first = start(first_args, log1)
    try:
        wait_for(*started_writing(place, out, trigger), first, log1)
        os.kill(first.pid, signal.SIGSTOP)
        holder = place.holder(out)
        assert holder is not None and holder.pid == first.pid
        before = place.final_files(out)

        t0 = time.monotonic()
        rc, text = second()
        took = time.monotonic() - t0
        assert rc == 2, text[-3000:]
        refusal_names(holder, text)
        assert took < 30, f"refused after {took:.1f} s"
        dry_rc, dry_text = dry_run()
        assert dry_rc == 0 and f"lease: held by run {holder.run_id}" in dry_text and "live" in dry_text, dry_text
        assert place.holder(out).run_id == holder.run_id                # the lease is the first run's still
        assert before <= place.final_files(out)                           # nothing of the first run removed
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
    rc, log = finish(first, log1)
    assert rc == 0, log[-4000:]
    assert_complete_once(place, out, keys, member, n_shards)
    assert json.loads(place.fs.cat_file(place.path(f"{out}/_run.json")))["run_id"] == holder.run_id


def kill_then_race(place, tmp_path, args, out, keys, member, n_shards, trigger) -> None:
    """The holder is SIGKILLed mid-run; two runs started together race for its lease: one proceeds."""
    log1 = tmp_path / "killed.log"
    first = start(args, log1)
    wait_for(*started_writing(place, out, trigger), first, log1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    dead = place.holder(out)
    assert dead is not None and dead.pid == first.pid                    # a dead run's lease, left behind
    time.sleep(1.0)  # let Ray reap the dead driver's actor, whose CPU the next run needs

    logs = [tmp_path / "racer-a.log", tmp_path / "racer-b.log"]
    racers = [start(args, p) for p in logs]
    results = [finish(p, log) for p, log in zip(racers, logs)]
    assert sorted(rc for rc, _ in results) == [0, 2], [t[-2000:] for _, t in results]
    (winner_log,) = [t for rc, t in results if rc == 0]
    (loser_log,) = [t for rc, t in results if rc == 2]
    assert f"took over the stale lease on {place.url(out)} of run {dead.run_id}" in winner_log, winner_log[-3000:]
    assert f"its process {dead.pid} on this machine is gone" in winner_log
    winner_id = json.loads(place.fs.cat_file(place.path(f"{out}/_run.json")))["run_id"]
    assert winner_id != dead.run_id and f"run {winner_id}" in loser_log, loser_log[-3000:]
    assert_complete_once(place, out, keys, member, n_shards)


# ----------------------------------------------------------------------------------------------------
# The inversion job


def test_second_inversion_run_is_refused_while_the_first_writes(place, photos, ray_session, tiny_checkpoint,
                                                                tmp_path):
    cfg = config(place, ray_session, tiny_checkpoint)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    def second():
        r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), "--config", str(cfg_path)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        return r.returncode, r.stdout + r.stderr

    def dry_run():
        lines: list[str] = []
        return run(resolve(cfg), dry_run=True, echo=lines.append).exit_code, "\n".join(lines)

    overlap_then_finish(place, tmp_path, ["--config", str(cfg_path)], second, dry_run, "out", photos,
                        "recon.jpg", N_SHARDS, trigger="commit")


def test_killed_inversion_run_is_taken_over_by_one_of_two_racers(place, photos, ray_session, tiny_checkpoint,
                                                                 tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config(place, ray_session, tiny_checkpoint)))
    kill_then_race(place, tmp_path, ["--config", str(cfg_path)], "out", photos, "recon.jpg", N_SHARDS,
                   trigger="commit")


# ----------------------------------------------------------------------------------------------------
# A latents subcommand: decode


@pytest.fixture(scope="module")
def inversions() -> dict[str, str]:
    """The decode tests' input per store, made by the first test that needs it."""
    return {}


@pytest.fixture
def inverted(place, photos, ray_session, tiny_checkpoint, inversions, tmp_path_factory) -> str:
    """An inversion output of N_SHARDS shards of ``photos``' keys, on the test's store, for decode to read."""
    kind = "local" if place.endpoint is None else "s3"
    if kind not in inversions:
        if kind == "local":
            url = str(tmp_path_factory.mktemp("lease_inv") / "inv")
        else:
            bucket = f"lease-inv-{uuid.uuid4().hex[:8]}"
            place.fs.mkdir(bucket)
            url = f"s3://{bucket}/inv"
        assert run(resolve(config(place, ray_session, tiny_checkpoint, url)), echo=lambda s: None).exit_code == 0
        inversions[kind] = url
    return inversions[kind]


def decode_args(place: Place, ray_session, inverted: str, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [f"ray.address={ray_session.get_runtime_context().gcs_address}", "progress=false"]
    if place.endpoint:
        sets.append(f"storage.endpoint_url={place.endpoint}")
    return ["decode", "--latents", inverted, "--output", place.url("dec"), *extra,
            *[a for s in sets for a in ("--set", s)]]


def test_second_decode_run_is_refused_while_the_first_writes(place, photos, inverted, ray_session, tmp_path):
    args = decode_args(place, ray_session, inverted)

    def second():
        r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), *args], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        return r.returncode, r.stdout + r.stderr

    def dry_run():
        r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), *args, "--dry-run"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        return r.returncode, r.stdout + r.stderr

    overlap_then_finish(place, tmp_path, args, second, dry_run, "dec", photos, "recon.jpg", N_SHARDS,
                        trigger="lease")


def test_killed_decode_run_is_taken_over_by_one_of_two_racers(place, photos, inverted, ray_session, tmp_path):
    kill_then_race(place, tmp_path, decode_args(place, ray_session, inverted), "dec", photos, "recon.jpg",
                   N_SHARDS, trigger="lease")
