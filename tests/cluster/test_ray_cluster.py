"""The pipeline on a real multi-node Ray cluster (issue 16), submitted the documented way.

One cluster per module, started with ``ray start`` as subprocesses (tests/helpers/ray_cluster.py): a head (1 CPU,
runs the job drivers and CPU tasks) and two worker nodes (1 CPU and the custom resource ``inverter`` each).
Jobs go through examples/submit_cluster.sh (``ray job submit`` with the repo as working dir), with local
input and output paths. The cluster is torn down by process id at the end whatever happens, and its temp
dirs are private (no ``ray_current_cluster`` under /tmp/ray for the embedded-Ray tests to find).

1. the example submits a job that succeeds and commits every shard exactly once;
2. node loss: the worker node holding the inversion actor is SIGKILLed (raylet, agents, workers) after the
   first shard commits; the job still succeeds (actor restarted on the other ``inverter`` node, shards retried);
3. ``ray job stop`` mid-run, then the same submission again: committed shards are skipped, the rest done;
4. a second submission of the same job while the first runs: refused (the job fails, naming the first run),
   writes nothing, and the first succeeds.

Bounded: each job waits at most JOB_TIMEOUT_S; the module takes about 2-4 minutes on 2 busy cores.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid

import pytest

from helpers.paths import DATA_DIR, REPO_ROOT
from helpers.ray_cluster import LocalCluster, running

SCRIPT = os.path.join(REPO_ROOT, "examples", "submit_cluster.sh")
N_PHOTOS = 48
SHARD_SIZE = 4
N_SHARDS = N_PHOTOS // SHARD_SIZE
JOB_TIMEOUT_S = 240
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# ----------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cluster(request):
    c = LocalCluster()
    request.addfinalizer(c.shutdown)   # registered before anything starts: torn down whatever happens
    c.start_head(num_cpus=1)
    c.add_node("worker-a", num_cpus=1, resources={"inverter": 1})
    c.add_node("worker-b", num_cpus=1, resources={"inverter": 1})
    return c


@pytest.fixture
def two_inverter_nodes(cluster):
    """Two live worker nodes with the ``inverter`` resource (a node killed by an earlier test is replaced)."""
    alive = [n for n in cluster.nodes if n.resources.get("inverter") and not n.killed]
    for i in range(2 - len(alive)):
        cluster.add_node(f"worker-r{len(cluster.nodes)}", num_cpus=1, resources={"inverter": 1})
    return cluster


@pytest.fixture
def jobs(cluster):
    """Submission ids of the test's jobs; any still running at the end (a failed test) is stopped, so that
    it does not hold the cluster's CPUs for the next test."""
    ids: list[str] = []
    yield ids
    client = job_client(cluster)
    for sid in ids:
        try:
            if str(client.get_job_status(sid).value) not in TERMINAL:
                client.stop_job(sid)
                deadline = time.time() + 30
                while str(client.get_job_status(sid).value) not in TERMINAL and time.time() < deadline:
                    time.sleep(0.5)
        except Exception:  # noqa: BLE001 - a job never submitted, or the cluster already gone
            pass


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N_PHOTOS small JPEGs cut from the real photographs in tests/data (crops at several scales)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("cluster_photos")
    srcs = [Image.open(os.path.join(DATA_DIR, f)).convert("RGB")
            for f in ("astronaut.jpg", "grace_hopper.jpg", "china.jpg")]
    for i in range(N_PHOTOS):
        im = srcs[i % len(srcs)]
        w, h = im.size
        s = min(w, h) * (55 + (i * 7) % 45) // 100
        x, y = (i * 37) % (w - s + 1), (i * 53) % (h - s + 1)
        im.crop((x, y, x + s, y + s)).resize((64, 64), Image.BILINEAR).save(out / f"p{i:03d}.jpg", quality=90)
    return str(out)


# ----------------------------------------------------------------------------------------------------
# Helpers


def pipeline_sets(photos: str, out: str, checkpoint: str, *extra: str, in_flight: int = 2) -> list[str]:
    sets = [f"input.url={photos}", "input.format=images", f"output.url={out}", f"model.checkpoint={checkpoint}",
            "model.precision=fp32", "model.batch_size=4", "align.enabled=false", f"shard_size={SHARD_SIZE}",
            "ray.chunk_size=4", f"ray.max_shards_in_flight={in_flight}", "retries=3", *extra]
    return [a for s in sets for a in ("--set", s)]


def submit(cluster: LocalCluster, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """examples/submit_cluster.sh, as a user runs it (RAY_ADDRESS = the dashboard)."""
    env = dict(cluster.env, RAY_ADDRESS=cluster.dashboard_url)
    return subprocess.run([SCRIPT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([cluster.ray_bin, *args], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def job_client(cluster: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


def job_logs(cluster: LocalCluster, sid: str) -> str:
    r = ray_cli(cluster, "job", "logs", "--address", cluster.dashboard_url, sid)
    return r.stdout + r.stderr


def wait_job(cluster: LocalCluster, sid: str, timeout: float = JOB_TIMEOUT_S) -> str:
    client = job_client(cluster)
    deadline = time.time() + timeout
    while True:
        status = str(client.get_job_status(sid).value)
        if status in TERMINAL:
            return status
        if time.time() > deadline:
            ray_cli(cluster, "job", "stop", "--address", cluster.dashboard_url, "--no-wait", sid)
            pytest.fail(f"job {sid} still {status} after {timeout} s; logs:\n{job_logs(cluster, sid)[-4000:]}")
        time.sleep(0.5)


def committed(out: str) -> list[str]:
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, "stats", "*.json")))


def wait_first_commit(cluster: LocalCluster, sid: str, out: str, timeout: float = JOB_TIMEOUT_S) -> list[str]:
    """Polls (every 0.1 s) until a shard's stats file exists; fails if the job ends first."""
    client = job_client(cluster)
    deadline = time.time() + timeout
    last_status_check = 0.0
    while True:
        done = committed(out)
        if done:
            return done
        if time.time() - last_status_check > 2:
            last_status_check = time.time()
            status = str(client.get_job_status(sid).value)
            if status in TERMINAL:
                pytest.fail(f"job {sid} ended ({status}) before any shard committed:\n{job_logs(cluster, sid)[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"no shard committed after {timeout} s:\n{job_logs(cluster, sid)[-4000:]}")
        time.sleep(0.1)


def inverter_actors(cluster: LocalCluster, sid: str) -> list[dict]:
    """The job's InvertWorker actors (any state), as the state API reports them."""
    from ray.util.state import list_actors

    job_id = job_client(cluster).get_job_info(sid).job_id
    assert job_id, f"job {sid} has no driver job id"
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "InvertWorker")],
                         detail=True, raise_on_missing_output=False, limit=1000)
    return [dict(a.__dict__) if hasattr(a, "__dict__") else dict(a) for a in actors if a["job_id"] == job_id]


def file_listing(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)


def assert_exactly_once(out: str, photos: str) -> None:
    """Every input exactly once in latents and images, every shard committed, nothing else in the output."""
    import pandas as pd

    shards = committed(out)
    assert len(shards) == N_SHARDS, shards
    expected_files = sorted(["_run.json", "_SUCCESS"] + [f"stats/{s}.json" for s in shards]
                            + [f"latents/{s}.parquet" for s in shards] + [f"images/{s}.tar" for s in shards])
    assert file_listing(out) == expected_files            # no orphans, no temporaries
    df = pd.read_parquet(os.path.join(out, "latents"))
    keys = sorted(os.path.splitext(f)[0] for f in os.listdir(photos))
    assert sorted(df["key"]) == keys                      # each input once: none lost, none twice
    assert set(df["status"]) == {"ok"}
    members = []
    for s in shards:
        with tarfile.open(os.path.join(out, "images", f"{s}.tar")) as tf:
            members += tf.getnames()
    assert sorted(members) == sorted(f"{k}.recon.jpg" for k in keys)
    inputs = []
    for s in shards:
        with open(os.path.join(out, "stats", f"{s}.json")) as f:
            inputs += json.load(f)["inputs"]
    assert sorted(inputs) == sorted(os.listdir(photos))
    with open(os.path.join(out, "_run.json")) as f:
        assert json.load(f)["status"] == "succeeded"


def settled_commits(out: str, quiet_s: float = 3.0, timeout: float = 60) -> list[str]:
    """The committed shards once no new one has appeared for ``quiet_s`` (a stopped job's last writes done)."""
    deadline = time.time() + timeout
    last, since = committed(out), time.time()
    while time.time() - since < quiet_s:
        if time.time() > deadline:
            pytest.fail(f"shards still being committed {timeout} s after the job stopped: {last}")
        time.sleep(0.2)
        now = committed(out)
        if now != last:
            last, since = now, time.time()
    return last


def stats_of(out: str) -> dict[str, dict]:
    res = {}
    for s in committed(out):
        with open(os.path.join(out, "stats", f"{s}.json")) as f:
            res[s] = json.load(f)
    return res


# ----------------------------------------------------------------------------------------------------
# Tests


def test_submit_script_without_address_is_refused_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([SCRIPT, "--set", f"output.url={tmp_path}/out"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "RAY_ADDRESS" in r.stderr and "dashboard" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_example_submits_a_job_that_commits_once(cluster, jobs, photos, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    sid = f"e2style-submit-{uuid.uuid4().hex[:8]}"
    jobs.append(sid)
    r = submit(cluster, "--submission-id", sid, *pipeline_sets(photos, out, tiny_checkpoint, "progress_interval_s=1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"Job '{sid}' succeeded" in r.stdout + r.stderr
    # What following the job shows: the periodic progress line of a job without a bar.
    assert re.search(rf"progress: \d+/{N_PHOTOS} images committed in \S+, [\d.]+ images/s, \d+ in flight, "
                     rf"shards \d+/{N_SHARDS} done, ETA ", r.stdout), \
        r.stdout[-4000:]
    assert str(job_client(cluster).get_job_status(sid).value) == "SUCCEEDED"
    # The job joined this cluster (ray.address auto), not an embedded Ray of its own.
    actors = inverter_actors(cluster, sid)
    assert len(actors) == 1, actors
    assert_exactly_once(out, photos)
    st = stats_of(out)
    assert all(s["attempt"] == 1 for s in st.values()), {k: s["attempt"] for k, s in st.items()}
    logs = job_logs(cluster, sid)
    assert f"{N_SHARDS} shard(s) [images]: 0 already committed, {N_SHARDS} to do" in logs
    # The cluster's address went to its private temp dirs, not to where an embedded ray.init() would look.
    with open(os.path.join(cluster.head.temp_dir, "ray_current_cluster")) as f:
        assert f.read().strip().endswith(f":{cluster.gcs_port}")
    default_file = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if os.path.exists(default_file):
        with open(default_file) as f:
            assert str(cluster.gcs_port) not in f.read()


def test_node_loss_mid_run_job_still_finishes(two_inverter_nodes, jobs, photos, tiny_checkpoint, tmp_path):
    cluster = two_inverter_nodes
    out = str(tmp_path / "out")
    sid = f"e2style-nodeloss-{uuid.uuid4().hex[:8]}"
    jobs.append(sid)
    r = submit(cluster, "--no-wait", "--submission-id", sid,
               *pipeline_sets(photos, out, tiny_checkpoint, "ray.actor_resources={inverter: 1}"), timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    wait_first_commit(cluster, sid, out)

    alive = [a for a in inverter_actors(cluster, sid) if a["state"] == "ALIVE"]
    assert len(alive) == 1, alive
    victim = cluster.node_of_pid(alive[0]["pid"])
    assert victim is not None and victim.resources.get("inverter"), \
        f"the inversion actor (pid {alive[0]['pid']}) is not on an 'inverter' worker node"
    first_node_id = alive[0]["node_id"]
    killed = cluster.kill_node(victim)
    done_at_kill = committed(out)
    assert alive[0]["pid"] in killed
    deadline = time.time() + 10
    while any(running(p) for p in killed) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in killed if running(p)], "processes of the killed node still run"
    assert len(done_at_kill) < N_SHARDS, "the job finished before the node was killed: nothing was tested"

    status = wait_job(cluster, sid)
    logs = job_logs(cluster, sid)
    assert status == "SUCCEEDED", logs[-4000:]
    assert_exactly_once(out, photos)
    # The actor was restarted, on the other inverter node (the killed one is dead).
    (actor,) = inverter_actors(cluster, sid)
    assert actor["num_restarts"] >= 1, actor
    assert actor["node_id"] != first_node_id
    nodes = {n["node_id"]: n for n in cluster.list_nodes()}
    assert nodes[first_node_id]["state"] == "DEAD"
    assert nodes[actor["node_id"]]["resources_total"].get("inverter") == 1


def test_job_stop_then_resubmit_skips_committed_shards(cluster, jobs, photos, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    # One shard at a time: the job is still running when the stop (a CLI start-up later) arrives.
    sets = pipeline_sets(photos, out, tiny_checkpoint, in_flight=1)
    sid1 = f"e2style-stop-{uuid.uuid4().hex[:8]}"
    jobs.append(sid1)
    r = submit(cluster, "--no-wait", "--submission-id", sid1, *sets, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    wait_first_commit(cluster, sid1, out)

    r = ray_cli(cluster, "job", "stop", "--address", cluster.dashboard_url, sid1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_job(cluster, sid1, timeout=60) == "STOPPED"
    settled_commits(out)
    first = stats_of(out)
    assert 0 < len(first) < N_SHARDS, f"stop was not mid-run: {len(first)} of {N_SHARDS} shards committed"
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    # The same submission again (a new submission id, as `ray job submit` gives each job).
    sid2 = f"e2style-resubmit-{uuid.uuid4().hex[:8]}"
    jobs.append(sid2)
    r = submit(cluster, "--submission-id", sid2, *sets)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert str(job_client(cluster).get_job_status(sid2).value) == "SUCCEEDED"
    logs = job_logs(cluster, sid2)
    n = len(first)
    assert f"{N_SHARDS} shard(s) [images]: {n} already committed, {N_SHARDS - n} to do" in logs, logs[-4000:]
    assert_exactly_once(out, photos)
    second = stats_of(out)
    for name, st in first.items():                 # skipped, not redone: the first job's commit stands
        assert second[name] == st
    assert len(re.findall(r"committed shard ", logs)) == N_SHARDS - n


def test_second_submission_while_the_first_runs_is_refused(cluster, jobs, photos, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "out")
    sets = pipeline_sets(photos, out, tiny_checkpoint, in_flight=1)
    sid1 = f"e2style-first-{uuid.uuid4().hex[:8]}"
    jobs.append(sid1)
    r = submit(cluster, "--no-wait", "--submission-id", sid1, *sets, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lease_path = os.path.join(out, "_lease.json")
    client = job_client(cluster)
    deadline = time.time() + JOB_TIMEOUT_S
    while not os.path.exists(lease_path):
        status = str(client.get_job_status(sid1).value)
        if status in TERMINAL or time.time() > deadline:
            pytest.fail(f"job {sid1} ({status}) never held its output's lease:\n{job_logs(cluster, sid1)[-4000:]}")
        time.sleep(0.1)
    with open(lease_path) as f:
        holder = json.load(f)
    # The first job's driver, held still while the second is submitted: alive, so its lease is live.
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        before = file_listing(out)
        sid2 = f"e2style-second-{uuid.uuid4().hex[:8]}"
        jobs.append(sid2)
        r = submit(cluster, "--submission-id", sid2, *sets)
        assert r.returncode != 0, r.stdout[-4000:] + r.stderr[-4000:]   # the script follows the job: it fails
        assert str(client.get_job_status(sid2).value) == "FAILED"
        logs = job_logs(cluster, sid2)
        assert f"refused: output {out} is being written by run {holder['run_id']}" in logs, logs[-4000:]
        assert f"pid {holder['pid']}" in logs and "last heartbeat" in logs
        after = set(file_listing(out))                          # the refused job removed nothing (the
        assert {f for f in before if not f.endswith(".tmp")} <= after   # first one's tasks may still write)
        assert not [f for f in after - set(before) if not f.startswith(("stats/", "latents/", "images/", "."))]
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    assert wait_job(cluster, sid1) == "SUCCEEDED", job_logs(cluster, sid1)[-4000:]
    assert_exactly_once(out, photos)
    with open(os.path.join(out, "_run.json")) as f:
        assert json.load(f)["run_id"] == holder["run_id"]
