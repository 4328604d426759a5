"""The inversion run: plan (every check, before anything is written), then the run's life cycle around the
inversion job (pipeline/inversion.py): the ledger's cleanup and run record, Ray, the summary, _SUCCESS.

    plan(cfg)  -> Plan: format, shards (committed or to do), fingerprint, checked stage options; writes nothing
    run(cfg)   -> RunResult: exit code 0 when every shard is committed, 1 when some failed after retries
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from .cluster import init_ray
from .config import ConfigError, PipelineConfig, fingerprint, redact
from .edit import directions_sha256
from .failures import FAILURES_FILE, format_failures, update_failures
from .inversion import run_inversion
from .ledger import RunLedger
from .options import checkpoint_identity, stage_options
from .progress import format_summary, summarise
from .read import Shard, plan_shards
from .report import write_contact_sheet
from .storage import get_fs, join, require_bucket, storage_errors, to_uri

__all__ = ["RunResult", "Plan", "run", "plan", "format_plan"]


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


@dataclass
class Plan:
    format: str
    shards: list[Shard]
    fingerprint: str
    fingerprint_values: dict
    checkpoint_sha256: str
    ledger: RunLedger
    stage_options: dict = field(default_factory=dict)   # checked task and edit directions (pipeline/options.py)

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if not s.committed]

    @property
    def prior(self) -> dict | None:
        return self.ledger.prior


def plan(cfg: PipelineConfig, ledger: RunLedger | None = None) -> Plan:
    """Check the checkpoint, the stage options, the output and the input, and list the shards. Writes nothing:
    a refused or invalid run (ConfigError, RefusedError) leaves the output as it was. ``ledger``: the one that
    holds the output's lease, to plan again under it."""
    ep = cfg.storage.endpoint_url
    sha = checkpoint_identity(cfg.model.checkpoint, ep)
    stages = stage_options(cfg, sha)  # a bad checkpoint, direction file or task stops here
    # Direction files by content: one replaced at the same path is another run.
    extra = {"edit.directions_sha256": directions_sha256(stages["edit"]["directions"])} if stages["edit"] else None
    fp, fp_values = fingerprint(cfg, sha, extra)
    with storage_errors("output.url", cfg.output.url, ep):  # no credentials, no endpoint, no bucket: exit 2
        ledger = ledger or RunLedger(cfg.output.url, ep)
        require_bucket(ledger.fs, ledger.root, "output.url", cfg.output.url, ep)
        committed = ledger.admit(fp, fp_values, cfg.output.overwrite)
    fs_in, in_root = get_fs(cfg.input.url, ep)
    try:
        with storage_errors("input.url", cfg.input.url, ep):
            fmt, shards = plan_shards(fs_in, in_root, cfg.input.format, cfg.shard_size, committed)
    except FileNotFoundError:
        raise ConfigError("input.url", f"nothing at {cfg.input.url}" + (f" (endpoint {ep})" if ep else "")
                          + ": check the path, or the bucket and prefix") from None
    except ValueError as e:
        raise ConfigError("input.format", str(e)) from None
    return Plan(fmt, shards, fp, fp_values, sha, ledger, stages)


def format_plan(p: Plan) -> str:
    lines = [f"format: {p.format}   shards: {len(p.shards)}   committed: {len(p.shards) - len(p.todo)}   "
             f"to do: {len(p.todo)}"]
    for s in p.shards:
        n = f"{len(s.paths)} images" if s.format == "images" else s.paths[0].rsplit("/", 1)[-1]
        lines.append(f"  {'done' if s.committed else 'todo'}  {s.name}  ({n})")
    return "\n".join(lines)


def run(cfg: PipelineConfig, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> RunResult:
    """Run the pipeline for a resolved config. Raises ConfigError / RefusedError before any work."""
    if dry_run:
        p = plan(cfg)
        echo(format_plan(p))
        echo(p.ledger.lease_report(cfg.output.lease_stale_s))
        return RunResult(0, skipped=[s.name for s in p.shards if s.committed])

    t_start = time.time()
    p = plan(cfg)
    with storage_errors("output.url", cfg.output.url, cfg.storage.endpoint_url):  # e.g. read-only credentials
        # The first write, everything checked: the output's lease (one writer per output, pipeline/lease.py).
        changed = p.ledger.hold(cfg.output.lease_wait_s, cfg.output.lease_stale_s)
    try:
        if changed:  # another run committed shards or ended between the plan and the lease
            p = plan(cfg, p.ledger)
        return _run_held(cfg, p, t_start, echo)
    finally:
        p.ledger.release()


def _run_held(cfg: PipelineConfig, p: Plan, t_start: float, echo: Callable[[str], None]) -> RunResult:
    """The run under the output's lease: cleanup, run record, the inversion job, summary, _SUCCESS."""
    with storage_errors("output.url", cfg.output.url, cfg.storage.endpoint_url):
        p.ledger.prepare()  # removes what an interrupted or overwritten run left: no other run writes here now
    todo = p.todo
    skipped = [s.name for s in p.shards if s.committed]
    p.ledger.start({
        "config": redact(cfg.to_dict()), "checkpoint": redact(cfg.model.checkpoint),
        "checkpoint_sha256": p.checkpoint_sha256, "fingerprint": p.fingerprint,
        "fingerprint_values": p.fingerprint_values, "input_format": p.format, "versions": _versions(),
        "argv": sys.argv, "previous_run": (p.prior or {}).get("started_at"),
    }, work_to_do=bool(todo))
    echo(f"{len(p.shards)} shard(s) [{p.format}]: {len(skipped)} already committed, {len(todo)} to do")

    committed: list[tuple[str, dict]] = []
    failed: dict[str, str] = {}
    processing = 0.0
    align_parts: dict[str, float] = {}
    if todo:
        started_ray = init_ray(cfg.ray)
        try:
            known_total = sum(len(s.paths) for s in todo) if p.format == "images" else None
            committed, failed, processing, align_parts = run_inversion(
                cfg, todo, fingerprint=p.fingerprint, checkpoint_sha256=p.checkpoint_sha256,
                stage_options=p.stage_options, known_total=known_total, echo=echo)
        finally:
            if started_ray:
                ray.shutdown()

    summary = summarise([st for _, st in committed], time.time() - t_start, processing)
    summary.update({"shards_total": len(p.shards), "shards_committed_now": len(committed),
                    "shards_skipped": len(skipped), "shards_failed": sorted(failed)})
    if align_parts:
        summary["align_seconds_by_part"] = align_parts  # the actors' alignment (align.backend torch)
    failures = update_failures(p.ledger.fs, p.ledger.root, committed, set(skipped))
    summary["inputs_failed_now"] = len(failures)
    p.ledger.finish(failed, summary, len(p.shards))
    out_uri = to_uri(p.ledger.fs, p.ledger.root)
    if not failed and cfg.output.contact_sheet:
        sheet = write_contact_sheet(p.ledger.fs, p.ledger.root)
        if sheet:
            echo(f"contact sheet (inputs above reconstructions): {to_uri(p.ledger.fs, sheet)}")
    echo(format_summary(summary, failed, out_uri, format_failures(failures, join(out_uri, FAILURES_FILE))))
    return RunResult(0 if not failed else 1, [n for n, _ in committed], failed, skipped, summary)
