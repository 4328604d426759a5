"""The run ledger of one output: which shards are committed, the refusal of a rerun made with another
checkpoint or config, the cleanup of what an interrupted run left, the run record (``_run.json``) and
``_SUCCESS``. The inversion runner and the latents subcommands both keep their outputs through it.

Order of a run: ``admit`` (reads only; refuses a mismatched rerun), then, once everything else is checked,
``prepare`` (the first write: an overwritten run's shards or an interrupted run's orphans are deleted),
``start`` (the record, status running), the shards, ``finish`` (the record's outcome, ``_SUCCESS``).
"""
from __future__ import annotations

import json
import logging
import posixpath
import time

from .storage import atomic_put, ensure_dir, get_fs, is_local

__all__ = ["RefusedError", "RunLedger", "now", "read_committed", "clean_uncommitted", "read_run_record",
           "write_run_record", "clear_outputs", "mark_success", "clear_success"]


class RefusedError(RuntimeError):
    """The output holds a run with another checkpoint or config, and output.overwrite is false."""


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
        self._detail = ""

    def admit(self, fingerprint: str, values: dict, overwrite: bool) -> dict[str, dict]:
        """Check the output against this run (nothing is written). Returns the shards already committed by a
        run of the same fingerprint; raises RefusedError for another run's output unless ``overwrite``."""
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

    def prepare(self) -> None:
        """The first write, once the run is admitted and everything else checked: remove the shards of the run
        being overwritten, and the uncommitted files an interrupted run left."""
        if self.replace:
            log.warning("output.overwrite: removing earlier outputs (%s)", self._detail)
            clear_outputs(self.fs, self.root)
        removed = clean_uncommitted(self.fs, self.root, set(self.committed))
        if removed:
            log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))

    def start(self, record: dict, work_to_do: bool) -> dict:
        """Write the run record (status running); with work to do, _SUCCESS goes until it is true again."""
        self.record = {"status": "running", "started_at": now(), "ended_at": None, **record}
        write_run_record(self.fs, self.root, self.record)
        if work_to_do:
            clear_success(self.fs, self.root)
        return self.record

    def finish(self, failed: dict[str, str], summary: dict, shards: int) -> dict:
        """Record the outcome; ``_SUCCESS`` when no shard failed."""
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
