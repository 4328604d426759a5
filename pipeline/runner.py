"""The Ray layer: plan, then stream shards through CPU tasks and GPU actors, committing each shard once.

Data flow per shard::

    prepare_shard (CPU task, streaming generator: read -> decode -> align, one chunk at a time)
        -> chunks batched across shards -> InvertWorker.invert_many (actor, one per GPU, model loaded once)
        -> finish_shard_task (CPU task: encode, Parquet + tar, commit with stats last)

The driver holds only object references and small headers, never pixels. Memory is bounded by
``ray.max_shards_in_flight`` (shards being prepared or waiting to be written) and by two outstanding calls
per actor, whatever the size of the input.
"""
from __future__ import annotations

import collections
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError, fingerprint, redact


def setup_logging(level: str = "INFO") -> None:
    """CLI logging: our records at `level`, the storage libraries' chatter at WARNING."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
from .read import Shard, plan_shards
from .storage import get_fs, to_uri
from .write import (clean_uncommitted, clear_outputs, clear_success, mark_success, read_committed,
                    read_run_record, write_run_record)

__all__ = ["RunResult", "RefusedError", "run", "plan", "cli_exit_code", "setup_logging"]

log = logging.getLogger("e2style.pipeline")

ACTOR_QUEUE = 2  # outstanding calls per inversion actor: one running, one queued so the device never idles


class RefusedError(RuntimeError):
    """The output holds a run with another checkpoint or config, and output.overwrite is false."""


def cli_exit_code(job: Callable[[], int]) -> int:
    """``job()``'s exit code; an invalid config or a refused output is printed to stderr and exits 2 (the
    checks run before anything is written)."""
    try:
        return job()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RefusedError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2


@dataclass
class RunResult:
    exit_code: int
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "numpy", "ray", "pyarrow", "pandas", "PIL", "fsspec", "s3fs", "dlib"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional package is reported as absent
            out[mod] = "absent"
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def checkpoint_sha256(cfg: dict) -> str:
    from .invert import file_sha256

    url = cfg["model"]["checkpoint"]
    if url.startswith("factory:"):
        from .invert import factory_checkpoint

        try:
            url = factory_checkpoint(url)
        except ValueError as e:
            raise ConfigError("model.checkpoint", str(e).split(": ", 1)[-1]) from None
    fs, path = get_fs(url, cfg["storage"]["endpoint_url"])
    try:
        return file_sha256(fs, path)
    except FileNotFoundError:
        raise ConfigError("model.checkpoint", f"file not found: {url}") from None


@dataclass
class Plan:
    format: str
    shards: list[Shard]
    fingerprint: str
    fingerprint_values: dict
    checkpoint_sha256: str
    prior: dict | None
    stage_options: dict = field(default_factory=dict)   # checked task and edit directions (pipeline/tasks.py)

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if not s.committed]


def plan(cfg: dict, *, apply: bool = False) -> Plan:
    """Check the output against the config and list the shards. ``apply``: also clean up (not in dry runs)."""
    ep = cfg["storage"]["endpoint_url"]
    sha = checkpoint_sha256(cfg)
    from .edit import directions_sha256
    from .tasks import stage_options
    stages = stage_options(cfg, sha)  # a bad direction file or a task the checkpoint cannot do stops here
    # Direction files by content: one replaced at the same path is another run.
    extra = {"edit.directions_sha256": directions_sha256(stages["edit"]["directions"])} if stages["edit"] else None
    fp, fp_values = fingerprint(cfg, sha, extra)
    fs_out, out_root = get_fs(cfg["output"]["url"], ep)
    prior = read_run_record(fs_out, out_root)
    replace = False
    if prior is not None and prior.get("fingerprint") != fp:
        old = prior.get("fingerprint_values") or {}
        diff = sorted(k for k in set(old) | set(fp_values) if old.get(k) != fp_values.get(k))
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {fp_values.get(k)!r}" for k in diff) or "unknown difference"
        if not cfg["output"]["overwrite"]:
            raise RefusedError(f"output {cfg['output']['url']} holds a run with another checkpoint or config "
                               f"({detail}); set output.overwrite=true to replace it, or choose another output.url")
        replace, prior = True, None
    committed = {} if replace else {n: st for n, st in read_committed(fs_out, out_root).items()
                                    if st.get("fingerprint") == fp}
    fs_in, in_root = get_fs(cfg["input"]["url"], ep)
    try:
        fmt, shards = plan_shards(fs_in, in_root, cfg["input"]["format"], cfg["shard_size"], committed)
    except FileNotFoundError as e:
        raise ConfigError("input.url", str(e)) from None
    except ValueError as e:
        raise ConfigError("input.format", str(e)) from None
    # Everything is checked: only now is the output changed (never in dry runs).
    if apply and replace:
        log.warning("output.overwrite: removing earlier outputs (%s)", detail)
        clear_outputs(fs_out, out_root)
    if apply:
        removed = clean_uncommitted(fs_out, out_root, set(committed))
        if removed:
            log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))
    return Plan(fmt, shards, fp, fp_values, sha, prior, stages)


def format_plan(p: Plan) -> str:
    lines = [f"format: {p.format}   shards: {len(p.shards)}   committed: {len(p.shards) - len(p.todo)}   "
             f"to do: {len(p.todo)}"]
    for s in p.shards:
        n = f"{len(s.paths)} images" if s.format == "images" else os.path.basename(s.paths[0])
        lines.append(f"  {'done' if s.committed else 'todo'}  {s.name}  ({n})")
    return "\n".join(lines)


def _init_ray(cfg: dict) -> bool:
    """Start or join Ray unless this process already did. Returns whether we started it (and stop it)."""
    import ray

    if ray.is_initialized():
        return False
    addr = cfg["ray"]["address"]
    if addr is None:
        # address="local": always a fresh embedded instance. ray.init() without an address would join a
        # running local cluster (or follow a stale ray_current_cluster file one left behind) and then
        # refuse num_cpus; only ray.address joins a cluster.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kw: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": True}
        if cfg["ray"]["num_cpus"]:
            kw["num_cpus"] = cfg["ray"]["num_cpus"]
        ray.init(**kw)
    else:
        ray.init(address=addr, log_to_driver=True)
    return True


@dataclass
class _ShardState:
    shard: Shard
    attempt: int
    gen: Any = None
    header_ref: Any = None                                   # the generator's pending header (chunk comes next)
    chunks: list = field(default_factory=list)               # chunk ObjectRefs in order
    results: dict = field(default_factory=dict)              # chunk index -> result ref or None
    reading_done: bool = False
    finish_ref: Any = None
    images: int = 0


class _Progress:
    def __init__(self, enabled: bool, total_images: int | None, total_shards: int):
        self.total_shards = total_shards
        self.shards_done = 0
        self.images = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
            self._post()

    def _post(self):
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.shards_done}/{self.total_shards}")

    def add_images(self, n: int):
        self.images += n
        if self.bar is not None:
            self.bar.update(n)

    def shard_done(self, estimate_total: int | None = None):
        self.shards_done += 1
        if self.bar is not None:
            if estimate_total is not None:
                self.bar.total = max(estimate_total, self.images)
                self.bar.refresh()
            self._post()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(cfg: dict, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> RunResult:
    """Run the pipeline for a resolved config. Raises ConfigError / RefusedError before any work."""
    if dry_run:
        p = plan(cfg, apply=False)
        echo(format_plan(p))
        return RunResult(0, skipped=[s.name for s in p.shards if s.committed])

    t_start = time.time()
    started_at = _now()
    ep = cfg["storage"]["endpoint_url"]
    fs_out, out_root = get_fs(cfg["output"]["url"], ep)
    p = plan(cfg, apply=True)
    record = {
        "status": "running", "started_at": started_at, "ended_at": None,
        "config": redact(cfg), "checkpoint": redact(cfg["model"]["checkpoint"]),
        "checkpoint_sha256": p.checkpoint_sha256, "fingerprint": p.fingerprint,
        "fingerprint_values": p.fingerprint_values, "input_format": p.format, "versions": _versions(),
        "argv": sys.argv, "previous_run": (p.prior or {}).get("started_at"),
    }
    write_run_record(fs_out, out_root, record)
    todo = p.todo
    skipped = [s.name for s in p.shards if s.committed]
    echo(f"{len(p.shards)} shard(s) [{p.format}]: {len(skipped)} already committed, {len(todo)} to do")
    if todo:
        clear_success(fs_out, out_root)

    failed: dict[str, str] = {}
    committed: list[str] = []
    stats_all: list[dict] = []
    processing = 0.0
    if todo:
        started_ray = _init_ray(cfg)
        try:
            t_proc = time.time()
            committed, failed, stats_all = _execute(cfg, p, todo, echo)
            processing = time.time() - t_proc
        finally:
            if started_ray:
                import ray
                ray.shutdown()

    wall = time.time() - t_start
    summary = _summarise(stats_all, wall, processing)
    summary.update({"shards_total": len(p.shards), "shards_committed_now": len(committed),
                    "shards_skipped": len(skipped), "shards_failed": sorted(failed)})
    ok = not failed
    record.update({"status": "succeeded" if ok else "failed", "ended_at": _now(), "summary": summary,
                   "failed_shards": failed})
    write_run_record(fs_out, out_root, record)
    if ok:
        mark_success(fs_out, out_root, {"ended_at": record["ended_at"], "shards": len(p.shards)})
        if cfg["output"]["contact_sheet"]:
            from .report import write_contact_sheet

            sheet = write_contact_sheet(fs_out, out_root)
            if sheet:
                echo(f"contact sheet (inputs above reconstructions): {to_uri(fs_out, sheet)}")
    echo(_format_summary(summary, failed, to_uri(fs_out, out_root)))
    return RunResult(0 if ok else 1, committed, failed, skipped, summary)


def _summarise(stats_all: list[dict], wall: float, processing: float = 0.0) -> dict:
    counts: dict[str, int] = collections.Counter()
    timings: dict[str, float] = collections.Counter()
    inputs = 0
    for st in stats_all:
        counts.update(st.get("counts", {}))
        timings.update(st.get("timings", {}))
        inputs += st.get("inputs_read", 0)
    busy = sum(timings.values()) or 1.0
    # images/s over the processing time (Ray start-up and planning excluded; wall_s has everything)
    return {"inputs": inputs, "rows": sum(counts.values()), "counts": dict(counts), "wall_s": round(wall, 3),
            "processing_s": round(processing, 3),
            "images_per_s": round(inputs / processing, 3) if processing > 0 else None,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
            "stage_share": {k: round(v / busy, 4) for k, v in sorted(timings.items())}}


def _format_summary(s: dict, failed: dict[str, str], out_uri: str) -> str:
    lines = ["", "=== summary ===",
             f"inputs: {s['inputs']}   rows: {s['rows']}   wall: {s['wall_s']:.1f} s   "
             f"throughput: {s['images_per_s'] or 0:.2f} images/s (over {s['processing_s']:.1f} s of processing)",
             "status counts: " + (", ".join(f"{k}={v}" for k, v in sorted(s["counts"].items())) or "(none)")]
    if s["stage_share"]:
        lines.append("stage time share: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["stage_share"].items()))
    lines.append(f"shards: {s['shards_total']} total, {s['shards_committed_now']} committed now, "
                 f"{s['shards_skipped']} already done, {len(failed)} failed")
    for name, why in sorted(failed.items()):
        lines.append(f"FAILED shard {name}: {why}")
    lines.append(f"outputs: {out_uri}" + ("" if failed else "  (_SUCCESS written)"))
    lines.append(f"read them: pandas.read_parquet('{out_uri.rstrip('/')}/latents')  |  images: "
                 f"{out_uri.rstrip('/')}/images/*.tar (WebDataset)")
    return "\n".join(lines)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    # Ray wraps task errors with a traceback; the last line says what went wrong.
    return (msg[-1] if msg else type(e).__name__)[:500]


def _execute(cfg: dict, p: Plan, todo: list[Shard], echo) -> tuple[list[str], dict[str, str], list[dict]]:
    import ray

    from workers.cpu_worker import finish_shard_task, prepare_shard
    from workers.invert_worker import InvertWorker

    res = ray.cluster_resources()
    n_gpus = int(res.get("GPU", 0))
    n_cpus = int(res.get("CPU", 1))
    rc = cfg["ray"]
    n_actors = rc["num_actors"] or max(1, n_gpus)
    actor_opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if n_gpus else {"num_cpus": 1}
    # A crashed actor (OOM, driver-level CUDA error) is restarted; the shards it held are retried.
    # max_concurrency=2: while one call's batches run on the GPU, the next call's inputs are unpacked,
    # pinned and copied (CUDA work from both threads goes to the same stream, in order).
    Actor = ray.remote(max_restarts=2, max_task_retries=0, max_concurrency=2)(InvertWorker)
    m = cfg["model"]
    actors = [Actor.options(**actor_opts).remote(
        m["checkpoint"], endpoint_url=cfg["storage"]["endpoint_url"], sha256=p.checkpoint_sha256,
        precision=m["precision"], device=m["device"], stages=m["stages"], batch_size=m["batch_size"],
        num_threads=m["num_threads"], compile=m["compile"], return_images=cfg["output"]["image_size"] > 0,
        edit_options=p.stage_options.get("edit"), task=p.stage_options.get("task"))
        for _ in range(n_actors)]
    try:
        info = ray.get(actors[0].info.remote())
    except Exception as e:  # noqa: BLE001 - surfaces as a config error naming the key
        for a in actors:
            ray.kill(a)
        raise ConfigError("model.checkpoint", f"cannot load the model: {_short(e)}") from None
    echo(f"model: n_latent={info['n_latent']} stages={info['stages']}/{info['num_stages']} "
         f"resolution={info['resolution']} device={info['device']}; {n_actors} inversion actor(s), {n_cpus} CPUs")
    cpu_for_tasks = max(1, n_cpus - (0 if n_gpus else n_actors))
    max_inflight = rc["max_shards_in_flight"] or cpu_for_tasks + 1
    prep = ray.remote(num_cpus=1, max_retries=0)(prepare_shard)
    fin = ray.remote(num_cpus=1, max_retries=0)(finish_shard_task)
    metadata = {"fingerprint": p.fingerprint, "checkpoint_sha256": p.checkpoint_sha256,
                "stages": str(info["stages"]), "style_dim": str(info["style_dim"])}

    queue = collections.deque((s, 1) for s in todo)
    active: dict[str, _ShardState] = {}
    batch_q: collections.deque = collections.deque()   # (shard name, attempt, chunk index, chunk ref, n_faces)
    actor_load = [0] * n_actors
    calls: dict[Any, tuple[int, list]] = {}             # last return ref of a call -> (actor index, refs)
    committed: list[str] = []
    failed: dict[str, str] = {}
    stats_all: list[dict] = []
    known_total = sum(len(s.paths) for s in todo) if p.format == "images" else None
    prog = _Progress(cfg["progress"], known_total, len(todo))
    batch_size = m["batch_size"]

    def start(shard: Shard, attempt: int):
        st = _ShardState(shard, attempt)
        st.gen = prep.remote(shard, cfg)
        active[shard.name] = st

    def fail(st: _ShardState, why: str):
        name = st.shard.name
        active.pop(name, None)
        for item in list(batch_q):
            if item[0] == name:
                batch_q.remove(item)
        if st.attempt <= cfg["retries"]:
            log.warning("shard %s failed (attempt %d), retrying: %s", name, st.attempt, why)
            queue.appendleft((st.shard, st.attempt + 1))
        else:
            log.error("shard %s failed after %d attempt(s): %s", name, st.attempt, why)
            failed[name] = why

    def maybe_finish(st: _ShardState):
        if st.finish_ref is not None or not st.reading_done or len(st.results) < len(st.chunks):
            return
        n = len(st.chunks)
        extra = {"format": st.shard.format, "input": st.shard.uri, "fingerprint": p.fingerprint,
                 "attempt": st.attempt, "n_latent": info["n_latent"]}
        if st.shard.format == "images":
            extra["inputs"] = [os.path.relpath(x, st.shard.root) if not x.startswith(st.shard.root + "/")
                               else x[len(st.shard.root) + 1:] for x in st.shard.paths]
        st.finish_ref = fin.remote(st.shard.name, cfg, info["n_latent"], extra, metadata, n,
                                   *st.chunks, *[st.results[i] for i in range(n)])

    def submit_batches(flush: bool):
        while batch_q:
            free = [i for i in range(n_actors) if actor_load[i] < ACTOR_QUEUE]
            if not free:
                return
            total = sum(it[4] for it in batch_q)
            if total < batch_size and not flush:
                return
            take, n = [], 0
            while batch_q and (n < batch_size or not take):
                it = batch_q.popleft()
                take.append(it)
                n += it[4]
            a = min(free, key=lambda i: actor_load[i])
            refs = actors[a].invert_many.options(num_returns=len(take)).remote(*[it[3] for it in take])
            refs = refs if isinstance(refs, list) else [refs]
            for it, r in zip(take, refs):
                st = active.get(it[0])
                if st is not None and st.attempt == it[1]:
                    st.results[it[2]] = r
            actor_load[a] += 1
            calls[refs[-1]] = (a, refs)
            for it in take:
                st = active.get(it[0])
                if st is not None and st.attempt == it[1]:
                    maybe_finish(st)

    try:
        while queue or active:
            while queue and len(active) < max_inflight:
                start(*queue.popleft())
            waitables: list = []
            gens: dict[Any, _ShardState] = {}
            for st in active.values():
                if not st.reading_done:
                    waitables.append(st.gen)
                    gens[st.gen] = st
                if st.finish_ref is not None:
                    waitables.append(st.finish_ref)
            waitables.extend(calls)
            ready, _ = ray.wait(waitables, num_returns=1, timeout=0.2) if waitables else ([], [])
            if not ready:
                submit_batches(flush=True)   # nothing new soon: send partial batches rather than idle
                continue
            for r in ready:
                if r in calls:
                    a, _refs = calls.pop(r)
                    actor_load[a] -= 1
                    continue
                st = gens.get(r)
                if st is not None:
                    try:
                        ref = next(st.gen)
                    except StopIteration:
                        st.reading_done = True
                        maybe_finish(st)
                        continue
                    try:
                        n_faces, _n_rows, n_inputs = ray.get(ref)
                        chunk_ref = next(st.gen)
                    except Exception as e:  # noqa: BLE001 - any failure fails the shard attempt
                        fail(st, f"prepare: {_short(e)}")
                        continue
                    idx = len(st.chunks)
                    st.chunks.append(chunk_ref)
                    st.images += n_inputs
                    prog.add_images(n_inputs)
                    if n_faces:
                        batch_q.append((st.shard.name, st.attempt, idx, chunk_ref, n_faces))
                    else:
                        st.results[idx] = None
                    continue
                st = next((s for s in active.values() if s.finish_ref == r), None)
                if st is None:
                    continue
                try:
                    stats = ray.get(r)
                except Exception as e:  # noqa: BLE001
                    fail(st, f"invert/write: {_short(e)}")
                    continue
                active.pop(st.shard.name, None)
                committed.append(st.shard.name)
                stats_all.append(stats)
                bad = {k: v for k, v in stats["counts"].items() if k != "ok"}
                log.info("committed shard %s: %d rows%s", st.shard.name, stats["rows"],
                         f" ({bad})" if bad else "")
                est = None
                if known_total is None and committed:
                    left = len(todo) - len(committed) - len(failed)
                    est = prog.images + int(prog.images / len(committed) * left) if left else prog.images
                prog.shard_done(est)
            submit_batches(flush=all(s.reading_done for s in active.values()))
    finally:
        prog.close()
        for a in actors:
            ray.kill(a)
    return committed, failed, stats_all
