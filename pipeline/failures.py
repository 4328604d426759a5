"""The inputs that did not become an ok row, listed for people: ``failures.jsonl`` under the output (one JSON
object per row: shard, key, source, status, error) for every committed shard, and the first few in the run's
summary. Rows come from the shards' Parquet files (the status and error columns), read only for shards whose
stats count a status other than ok, so a clean run reads nothing back."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from .storage import atomic_put, join

__all__ = ["FAILURES_FILE", "FAILURES_SHOWN", "FAILURE_COLUMNS", "update_failures", "format_failures"]

FAILURES_FILE = "failures.jsonl"
FAILURES_SHOWN = 20  # in the summary; the rest are in FAILURES_FILE
FAILURE_COLUMNS = ("key", "source", "status", "error")


def _shard_failures(fs, root: str, name: str) -> list[dict]:
    with fs.open(join(root, "latents", f"{name}.parquet"), "rb") as f:
        table = pq.read_table(f, columns=list(FAILURE_COLUMNS), filters=[("status", "!=", "ok")])
    return [{"shard": name, **row} for row in table.to_pylist()]


def _previous(fs, root: str) -> list[dict]:
    path = join(root, FAILURES_FILE)
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def update_failures(fs, root: str, committed_now: list[tuple[str, dict]], kept: set[str]) -> list[dict]:
    """Rewrite ``failures.jsonl``: the earlier runs' rows of the shards still committed (``kept``) and the rows of
    the shards committed now; returns the latter (this run's failures). Writes nothing when there is nothing
    to list and no file to update."""
    now = [r for name, stats in sorted(committed_now, key=lambda c: c[0])
           if any(n for status, n in stats.get("counts", {}).items() if status != "ok")
           for r in _shard_failures(fs, root, name)]
    earlier = [r for r in _previous(fs, root) if r.get("shard") in kept]
    rows = earlier + now
    if rows or fs.exists(join(root, FAILURES_FILE)):
        atomic_put(fs, join(root, FAILURES_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode())
    return now


def format_failures(failures: list[dict], where: str, shown: int = FAILURES_SHOWN) -> list[str]:
    """Summary lines: up to ``shown`` failed inputs with their status and error, then where the rest are."""
    if not failures:
        return []
    lines = [f"inputs that failed in this run: {len(failures)} (all in {where})"]
    for r in failures[:shown]:
        error = (r.get("error") or "").splitlines()[0][:160] if r.get("error") else ""
        lines.append(f"  {r['status']:<13} {r['source'] or r['key']}" + (f": {error}" if error else ""))
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more in {where}")
    return lines
