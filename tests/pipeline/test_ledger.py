"""The run ledger without Ray, on a local output: admission reads only, refusal of another run's output,
cleanup of an interrupted run's orphans (only under the output's lease), overwrite, the run record and
_SUCCESS."""
from __future__ import annotations

import json

import fsspec
import pytest

from pipeline.lease import LEASE_NAME
from pipeline.ledger import RefusedError, RunLedger
from pipeline.storage import atomic_put


STALE_S = 300


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def atomic_put_local(path, data: bytes) -> None:
    atomic_put(fsspec.filesystem("file"), str(path), data)


def _commit(root, name: str, fingerprint: str) -> None:
    """A shard committed as write.write_shard does it: images, latents, then stats."""
    for sub, ext in (("images", "tar"), ("latents", "parquet")):
        atomic_put_local(root / sub / f"{name}.{ext}", b"data of " + name.encode())
    atomic_put_local(root / "stats" / f"{name}.json", json.dumps({"fingerprint": fingerprint}).encode())


def _run(root, fingerprint: str, committed: list[str], failed: dict[str, str] | None = None) -> None:
    """A whole run through the ledger whose shards ``committed`` are written meanwhile."""
    ledger = RunLedger(str(root))
    ledger.admit(fingerprint, {"k": fingerprint}, overwrite=False)
    ledger.hold(0, STALE_S)
    ledger.prepare()
    ledger.start({"fingerprint": fingerprint, "fingerprint_values": {"k": fingerprint}}, work_to_do=True)
    for name in committed:
        _commit(root, name, fingerprint)
    ledger.finish(failed or {}, {"shards": len(committed)}, len(committed) + len(failed or {}))
    ledger.release()


def test_a_rerun_sees_its_committed_shards_and_loses_the_orphans(tmp_path):
    out = tmp_path / "out"
    _run(out, "fp1", ["a", "b"], failed={"c": "boom"})
    assert json.loads((out / "_run.json").read_text())["status"] == "failed"
    assert not (out / "_SUCCESS").exists()
    atomic_put_local(out / "latents" / "c.parquet", b"half of c")  # a crash between latents and stats

    ledger = RunLedger(str(out))
    assert set(ledger.admit("fp1", {"k": "fp1"}, overwrite=False)) == {"a", "b"}
    assert (out / "latents" / "c.parquet").exists()  # admission writes nothing
    with pytest.raises(RuntimeError, match="lease"):
        ledger.prepare()  # deleting without the lease: another run may be writing these files
    assert (out / "latents" / "c.parquet").exists()
    assert ledger.hold(0, STALE_S) is False  # nothing changed since admit()
    ledger.prepare()
    assert not (out / "latents" / "c.parquet").exists() and (out / "latents" / "a.parquet").exists()
    ledger.start({"fingerprint": "fp1"}, work_to_do=True)
    _commit(out, "c", "fp1")
    rec = ledger.finish({}, {"shards": 1}, 3)
    assert rec["status"] == "succeeded" and rec["ended_at"] and json.loads((out / "_SUCCESS").read_text())["shards"] == 3
    assert rec["run_id"] == ledger.lease.run_id
    ledger.release()
    assert not (out / LEASE_NAME).exists()


def test_another_runs_output_is_refused_untouched_or_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    _run(out, "fp1", ["a"])
    atomic_put_local(out / "images" / "z.tar", b"orphan")
    before = _files(out)
    with pytest.raises(RefusedError, match=r"k: 'fp1' -> 'fp2'"):
        RunLedger(str(out)).admit("fp2", {"k": "fp2"}, overwrite=False)
    assert _files(out) == before

    ledger = RunLedger(str(out))
    assert ledger.admit("fp2", {"k": "fp2"}, overwrite=True) == {}  # nothing of the old run counts
    assert _files(out) == before  # still nothing written: that is prepare()'s job
    ledger.hold(0, STALE_S)
    ledger.prepare()
    assert sorted(_files(out)) == [LEASE_NAME, "_run.json"]
    assert ledger.prior is None
    ledger.release()
    assert sorted(_files(out)) == ["_run.json"]


def test_shards_of_another_fingerprint_are_not_committed_for_this_run(tmp_path):
    """A stats file left by a run of another fingerprint (e.g. written after an overwrite started) is not
    taken as this run's."""
    out = tmp_path / "out"
    _run(out, "fp1", ["a"])
    _commit(out, "b", "fp-other")
    assert set(RunLedger(str(out)).admit("fp1", {"k": "fp1"}, overwrite=False)) == {"a"}


def test_the_lease_readmits_what_changed_since_the_plan(tmp_path):
    """A run planned while another was writing sees, under the lease, the shards that run committed meanwhile:
    its cleanup must not take them for orphans."""
    out = tmp_path / "out"
    _run(out, "fp1", ["a"])
    ledger = RunLedger(str(out))
    assert set(ledger.admit("fp1", {"k": "fp1"}, overwrite=False)) == {"a"}
    _commit(out, "b", "fp1")                       # the other run's commit, after this run's plan
    assert ledger.hold(0, STALE_S) is True
    assert set(ledger.committed) == {"a", "b"}
    ledger.prepare()
    assert (out / "latents" / "b.parquet").exists() and (out / "images" / "b.tar").exists()
    ledger.release()
