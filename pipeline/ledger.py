"""The run ledger of one output: which shards are committed, the refusal of a rerun made with another
checkpoint or config, the cleanup of what an interrupted run left, the run record (``_run.json``) and
``_SUCCESS``. The inversion runner and the latents subcommands both keep their outputs through it.

Order of a run: ``admit`` (reads only; refuses a mismatched rerun), then, once everything else is checked,
``hold`` (the first write: the output's lease, pipeline/lease.py, then the output read again under it),
``prepare`` (an overwritten run's shards or an interrupted run's orphans are deleted), ``start`` (the record,
status running), the shards, ``finish`` (the record's outcome, ``_SUCCESS``), ``release`` (the lease).
"""
from __future__ import annotations

import json
import logging
import posixpath
import time

from .lease import LeaseLostError, OutputLease
from .storage import atomic_put, ensure_dir, get_fs, is_local

__all__ = ["RefusedError", "OutputBusyError", "RunLedger", "now", "read_committed", "clean_uncommitted", "read_run_record",
           "write_run_record", "clear_outputs", "mark_success", "clear_success"]


class RefusedError(RuntimeError):
    """The output holds a run with another checkpoint or config, and output.overwrite is false."""


class OutputBusyError(RefusedError):
    """Another live run holds the output's lease."""


log = logging.getLogger("e2style.ledger")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunLedger:
    def __init__(self, url: str, endpoint_url: str | None = None):
        self.url = url
        self.fs, self.root = get_fs(url, endpoint_url)
        self.prior: dict | None = None       # the earlier run's record, when this run continues it
        self.replace = False                 # output.overwrite of another run: its shards go in prepare()
        self.committed: dict[str, dict] = {}  # shard -> stats, of this run's fingerprint
        self.lease: OutputLease | None = None
        self._detail = ""
        self._admitted: tuple = ()

    def admit(self, fingerprint: str, values: dict, overwrite: bool) -> dict[str, dict]:
        """Check the output against this run (nothing is written). Returns the shards already committed by a
        run of the same fingerprint; raises RefusedError for another run's output unless ``overwrite``."""
        self._admitted, self.replace = (fingerprint, values, overwrite), False
        prior = read_run_record(self.fs, self.root)
        if prior is not None and prior.get("fingerprint") != fingerprint:
            old = prior.get("fingerprint_values") or {}
            diff = sorted(k for k in set(old) | set(values) if old.get(k) != values.get(k))
            self._detail = "; ".join(f"{k}: {old.get(k)!r} -> {values.get(k)!r}" for k in diff) or "unknown difference"
            if not overwrite:
                raise RefusedError(f"output {self.url} holds a run with another checkpoint or config ({self._detail}); "
                                   f"set output.overwrite=true to replace it, or choose another output")
            self.replace, prior = True, None
        self.prior = prior
        self.committed = {} if self.replace else {n: st for n, st in read_committed(self.fs, self.root).items()
                                                   if st.get("fingerprint") == fingerprint}
        return self.committed

    def lease_report(self, stale_s: float) -> str:
        """The output's lease as ``--dry-run`` shows it (read only)."""
        lease = OutputLease(self.fs, self.root, self.url, stale_s=stale_s)
        holder = lease.peek()
        if holder is None:
            return "lease: free"
        why = lease.dead_because(holder)
        if why:
            return f"lease: held by {holder.describe()}, dead ({why}): a run now takes it over"
        return f"lease: held by {holder.describe()}, live: a run now is refused (or waits, output.lease_wait_s)"

    def hold(self, wait_s: float, stale_s: float) -> bool:
        """Take the output's lease (the run's first write, once everything is checked), then admit the run again
        under it: another run may have committed shards or ended since. Returns whether what ``admit`` saw
        changed; raises OutputBusyError while a live run holds the lease (after ``wait_s``)."""
        lease = OutputLease(self.fs, self.root, self.url, stale_s=stale_s, wait_s=wait_s)
        holder = lease.acquire()
        if holder is not None:
            raise OutputBusyError(lease.refusal(holder))
        self.lease = lease
        before = (set(self.committed), self.prior, self.replace)
        try:
            self.admit(*self._admitted)
        except BaseException:
            self.release()
            raise
        return (set(self.committed), self.prior, self.replace) != before

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def prepare(self) -> None:
        """Once the lease is held: remove the shards of the run being overwritten, and the uncommitted files
        an interrupted run left (no other run writes here now)."""
        if self.lease is None or not self.lease.held:
            raise RuntimeError("RunLedger.prepare() deletes files: hold() the output's lease first")
        if self.replace:
            log.warning("output.overwrite: removing earlier outputs (%s)", self._detail)
            clear_outputs(self.fs, self.root)
        removed = clean_uncommitted(self.fs, self.root, set(self.committed))
        if removed:
            log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))

    def start(self, record: dict, work_to_do: bool) -> dict:
        """Write the run record (status running); with work to do, _SUCCESS goes until it is true again."""
        self.record = {"status": "running", "started_at": now(), "ended_at": None, "run_id": self.lease.run_id,
                       **record}
        write_run_record(self.fs, self.root, self.record)
        if work_to_do:
            clear_success(self.fs, self.root)
        return self.record

    def finish(self, failed: dict[str, str], summary: dict, shards: int) -> dict:
        """Record the outcome; ``_SUCCESS`` when no shard failed."""
        if self.lease.lost:
            raise LeaseLostError(f"the lease on {self.url} was taken over by another run while this one ran: "
                                 f"this run's record and _SUCCESS are left to it")
        ok = not failed
        self.record.update({"status": "succeeded" if ok else "failed", "ended_at": now(), "summary": summary,
                            "failed_shards": failed})
        write_run_record(self.fs, self.root, self.record)
        if ok:
            mark_success(self.fs, self.root, {"ended_at": self.record["ended_at"], "shards": shards})
        return self.record


def read_committed(fs, root: str) -> dict[str, dict]:
    """shard name -> stats record, for every committed shard under ``root``."""
    fs.invalidate_cache()  # s3fs caches listings; workers wrote since the last look
    pattern = posixpath.join(root, "stats", "*.json")
    paths = fs.glob(pattern)
    if not paths:
        return {}
    out: dict[str, dict] = {}
    for p, data in fs.cat(paths, on_error="return").items():
        if isinstance(data, BaseException):
            continue
        try:
            out[posixpath.basename(p)[: -len(".json")]] = json.loads(data)
        except ValueError:
            continue  # cannot happen with atomic writes; an unreadable marker is treated as not committed
    return out


def clean_uncommitted(fs, root: str, committed: set[str]) -> list[str]:
    """Delete latents/images files whose shard has no stats (left by a crash), and local temporaries."""
    fs.invalidate_cache()
    removed = []
    for sub, ext in (("latents", ".parquet"), ("images", ".tar")):
        d = posixpath.join(root, sub)
        try:
            entries = fs.ls(d, detail=False)
        except FileNotFoundError:
            continue
        for p in entries:
            base = posixpath.basename(p)
            name = base[: -len(ext)] if base.endswith(ext) else None
            if (name is None and base.startswith(".") and base.endswith(".tmp")) or (name and name not in committed):
                fs.rm_file(p)
                removed.append(p)
    if is_local(fs):
        d = posixpath.join(root, "stats")
        if fs.exists(d):
            for p in fs.ls(d, detail=False):
                if posixpath.basename(p).endswith(".tmp"):
                    fs.rm_file(p)
    return removed


def read_run_record(fs, root: str) -> dict | None:
    p = posixpath.join(root, "_run.json")
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(p))
    except FileNotFoundError:
        return None


def write_run_record(fs, root: str, record: dict) -> None:
    ensure_dir(fs, root)
    atomic_put(fs, posixpath.join(root, "_run.json"), json.dumps(record, indent=1, default=str).encode())


def clear_outputs(fs, root: str) -> None:
    """output.overwrite: forget every shard of an earlier run (stats first, so nothing looks committed)."""
    fs.invalidate_cache()
    for sub in ("stats", "latents", "images"):
        d = posixpath.join(root, sub)
        if fs.exists(d):
            fs.rm(d, recursive=True)
    clear_success(fs, root)


def mark_success(fs, root: str, summary: dict) -> None:
    atomic_put(fs, posixpath.join(root, "_SUCCESS"), json.dumps(summary, default=str).encode())


def clear_success(fs, root: str) -> None:
    p = posixpath.join(root, "_SUCCESS")
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass
