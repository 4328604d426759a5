"""End to end, S3 -> S3 through moto's server and a real local Ray: the three input formats, read-back with
pandas and pyarrow, incremental runs, refusal of a changed config, and bad inputs."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.inputs import make_parquet, make_tar, pipeline_config, tiny_image_bytes
from helpers.paths import REPO_ROOT
from pipeline.ledger import RefusedError
from pipeline.runner import run

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def _read_latents(fs, root: str) -> pd.DataFrame:
    fs.invalidate_cache()
    files = sorted(fs.glob(f"{root}/latents/*.parquet"))
    assert files, f"no latents under {root}"
    return pd.concat([pd.read_parquet(p, filesystem=fs) for p in files], ignore_index=True)


def _stats(fs, root: str) -> dict[str, dict]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1][:-5]: json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/stats/*.json")}


def _check_outputs(fs, root: str, expected_keys: set[str], n_latent: int = 10):
    df = _read_latents(fs, root)
    assert set(df.key) == expected_keys
    assert df.key.is_unique
    ok = df[df.status == "ok"]
    assert len(ok) > 0
    assert all(len(c) == n_latent * 512 for c in ok.codes)
    assert ok.recon_psnr.notna().all() and (ok.recon_mse > 0).all()
    assert df[df.status != "ok"].codes.isna().all()
    # pyarrow reads the whole output as one dataset with the declared schema and shape metadata
    ds = pads.dataset(f"{root}/latents", filesystem=fs, format="parquet")
    t = ds.to_table()
    assert t.num_rows == len(df)
    md = pq.read_schema(fs.open(fs.glob(f"{root}/latents/*.parquet")[0])).metadata
    assert json.loads(md[b"codes_shape"]) == [n_latent, 512]
    codes = np.stack(ok.codes.to_numpy()).reshape(-1, n_latent, 512)
    assert codes.dtype == np.float32 and np.isfinite(codes).all()
    # one recon image per ok row, in the shard's tar, named by the row's key
    members = set()
    for p in fs.glob(f"{root}/images/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(p))) as tf:
            members |= set(tf.getnames())
    assert members == {f"{k}.recon.jpg" for k in ok.key}
    assert fs.exists(f"{root}/_SUCCESS")
    rec = json.loads(fs.cat_file(f"{root}/_run.json"))
    assert rec["status"] == "succeeded" and len(rec["checkpoint_sha256"]) == 64
    return df


def test_images_folder_s3_to_s3_and_incremental(s3fs_session, s3_bucket, moto_server, tiny_checkpoint):
    fs = s3fs_session
    keys = set()
    for i in range(7):
        key = f"people/p{i}" if i % 2 else f"x{i}"
        fs.pipe_file(f"{s3_bucket}/in/{key}.{'png' if i == 3 else 'jpg'}", tiny_image_bytes(i, "PNG" if i == 3 else "JPEG"))
        keys.add(key)
    fs.pipe_file(f"{s3_bucket}/in/notes.txt", b"not an image, not listed")
    cfg = pipeline_config(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server, shard_size=3)
    res = run(cfg, echo=lambda s: None)
    assert res.exit_code == 0 and len(res.committed) == 3
    df = _check_outputs(fs, f"{s3_bucket}/out", keys)
    assert (df.status == "ok").all()
    first_stats = _stats(fs, f"{s3_bucket}/out")

    # Grown input: only the new files are processed, in new shards; old shards are left untouched.
    for i in range(7, 10):
        fs.pipe_file(f"{s3_bucket}/in/new/n{i}.jpg", tiny_image_bytes(i))
        keys.add(f"new/n{i}")
    fs.invalidate_cache()
    res2 = run(cfg, echo=lambda s: None)
    assert res2.exit_code == 0
    assert len(res2.committed) == 1 and sorted(res2.skipped) == sorted(first_stats)
    after = _stats(fs, f"{s3_bucket}/out")
    for name, st in first_stats.items():
        assert after[name]["committed_at"] == st["committed_at"]  # not rewritten
    _check_outputs(fs, f"{s3_bucket}/out", keys)

    # Nothing new: nothing to do.
    res3 = run(cfg, echo=lambda s: None)
    assert res3.exit_code == 0 and res3.committed == []


def test_webdataset_s3_to_s3(s3fs_session, s3_bucket, moto_server, tiny_checkpoint):
    fs = s3fs_session
    keys = set()
    for shard in range(2):
        samples = {f"{shard:05d}{i:04d}": tiny_image_bytes(100 * shard + i) for i in range(5)}
        keys |= set(samples)
        fs.pipe_file(f"{s3_bucket}/wds/{shard:05d}.tar", make_tar(samples))
        fs.pipe_file(f"{s3_bucket}/wds/{shard:05d}_stats.json", b"{}")  # img2dataset's side files: ignored
    cfg = pipeline_config(f"s3://{s3_bucket}/wds", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server,
                          output__save_aligned=True)
    res = run(cfg, echo=lambda s: None)
    assert res.exit_code == 0 and sorted(res.committed) == ["00000", "00001"]
    df = _read_latents(fs, f"{s3_bucket}/out")
    assert set(df.key) == keys and (df.status == "ok").all()
    assert all(s.startswith(f"s3://{s3_bucket}/wds/0000") and "#" in s for s in df.source)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{s3_bucket}/out/images/00000.tar"))) as tf:
        names = set(tf.getnames())
    k = sorted(keys)[0]
    assert {f"{k}.recon.jpg", f"{k}.aligned.jpg"} <= names


def test_parquet_s3_to_s3_both_layouts(s3fs_session, s3_bucket, moto_server, tiny_checkpoint):
    fs = s3fs_session
    a = {f"a{i}": tiny_image_bytes(i) for i in range(4)}
    b = {f"b{i}": tiny_image_bytes(50 + i) for i in range(3)}
    fs.pipe_file(f"{s3_bucket}/pq/part-0.parquet", make_parquet(a, "img2dataset"))
    fs.pipe_file(f"{s3_bucket}/pq/sub/part-1.parquet", make_parquet(b, "huggingface"))
    cfg = pipeline_config(f"s3://{s3_bucket}/pq", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server)
    res = run(cfg, echo=lambda s: None)
    assert res.exit_code == 0 and sorted(res.committed) == ["part-0", "sub__part-1"]
    df = _check_outputs(fs, f"{s3_bucket}/out", set(a) | set(b))
    assert (df.status == "ok").all()
    assert any(s.endswith("#row=0") for s in df.source)


def test_changed_config_or_checkpoint_refused(s3fs_session, s3_bucket, moto_server, tiny_checkpoint,
                                              tiny_checkpoint_other):
    fs = s3fs_session
    for i in range(3):
        fs.pipe_file(f"{s3_bucket}/in/i{i}.jpg", tiny_image_bytes(i))
    out = f"s3://{s3_bucket}/out"
    cfg = pipeline_config(f"s3://{s3_bucket}/in", out, tiny_checkpoint, moto_server)
    assert run(cfg, echo=lambda s: None).exit_code == 0
    before = _stats(fs, f"{s3_bucket}/out")

    with pytest.raises(RefusedError, match="checkpoint_sha256"):
        run(pipeline_config(f"s3://{s3_bucket}/in", out, tiny_checkpoint_other, moto_server), echo=lambda s: None)
    with pytest.raises(RefusedError, match="model.stages"):
        run(pipeline_config(f"s3://{s3_bucket}/in", out, tiny_checkpoint, moto_server, model__stages=1),
            echo=lambda s: None)
    assert _stats(fs, f"{s3_bucket}/out") == before  # refusal touched nothing

    # A speed-only change (batch size) is not a different run.
    assert run(pipeline_config(f"s3://{s3_bucket}/in", out, tiny_checkpoint, moto_server, model__batch_size=2),
               echo=lambda s: None).exit_code == 0

    # overwrite: the old run's shards are replaced by the new checkpoint's
    res = run(pipeline_config(f"s3://{s3_bucket}/in", out, tiny_checkpoint_other, moto_server,
                              output__overwrite=True), echo=lambda s: None)
    assert res.exit_code == 0 and len(res.committed) == 1
    rec = json.loads(fs.cat_file(f"{s3_bucket}/out/_run.json"))
    st = _stats(fs, f"{s3_bucket}/out")
    assert all(s["fingerprint"] == rec["fingerprint"] for s in st.values())
    with open(tiny_checkpoint_other, "rb") as f:
        assert rec["checkpoint_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert all(s["committed_at"] != before[n]["committed_at"] for n, s in st.items() if n in before)


def test_dry_run_plans_without_writing(s3fs_session, s3_bucket, moto_server, tiny_checkpoint):
    fs = s3fs_session
    for i in range(5):
        fs.pipe_file(f"{s3_bucket}/in/i{i}.jpg", tiny_image_bytes(i))
    lines: list[str] = []
    cfg = pipeline_config(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server, shard_size=2)
    assert run(cfg, dry_run=True, echo=lines.append).exit_code == 0
    text = "\n".join(lines)
    assert "shards: 3" in text and "images-000002" in text
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/out")


# ----------------------------------------------------------------------------------------------------
# Storage that a run cannot start with: one line, exit 2, the URL and endpoint named, nothing written.

def _free_port() -> int:
    import socket

    with socket.socket() as s:  # bound then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_subprocess(env_drop: tuple[str, ...] = (), *sets: str):
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"})
    args = [sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), "--set", "align.enabled=false",
            "--set", "progress=false"]
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def _assert_one_line_exit_2(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    for w in words:
        assert w in err, err


def test_no_credentials_exit_2_one_line(s3fs_session, s3_bucket, moto_server, tiny_checkpoint, tmp_path):
    s3fs_session.pipe_file(f"{s3_bucket}/in/a.png", tiny_image_bytes(0, "PNG"))
    proc, _ = _cli_subprocess(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), f"input.url=s3://{s3_bucket}/in",
                              f"output.url=s3://{s3_bucket}/out", f"model.checkpoint={tiny_checkpoint}",
                              f"storage.endpoint_url={moto_server}")
    _assert_one_line_exit_2(proc, "error: storage: output.url=s3://", f"endpoint {moto_server}",
                            "no S3 credentials found", "AWS_ACCESS_KEY_ID")
    assert not s3fs_session.exists(f"{s3_bucket}/out")


def test_unreachable_endpoint_fails_in_seconds_exit_2(tiny_checkpoint, tmp_path):
    from pipeline.storage import S3_CONNECT_TIMEOUT_S, S3_MAX_ATTEMPTS

    endpoint = f"http://127.0.0.1:{_free_port()}"
    proc, took = _cli_subprocess((), "input.url=s3://bucket/photos", f"output.url={tmp_path / 'out'}",
                                 f"model.checkpoint={tiny_checkpoint}", f"storage.endpoint_url={endpoint}")
    _assert_one_line_exit_2(proc, "input.url=s3://bucket/photos", f"endpoint {endpoint}", "cannot reach the endpoint",
                            f"after {S3_MAX_ATTEMPTS} attempts", "check storage.endpoint_url")
    # Bounded: the attempts' backoff (2 s, then 4 s at most) beside start-up, not botocore's legacy 5 attempts.
    assert took < 30 + S3_MAX_ATTEMPTS * S3_CONNECT_TIMEOUT_S, took
    assert not (tmp_path / "out").exists()


def test_missing_bucket_and_prefix_exit_2(s3fs_session, s3_bucket, moto_server, tiny_checkpoint, tmp_path, capsys):
    import run_pipeline

    s3fs_session.pipe_file(f"{s3_bucket}/in/a.png", tiny_image_bytes(0, "PNG"))
    base = ["--set", "align.enabled=false", "--set", "progress=false", "--set", f"storage.endpoint_url={moto_server}",
            "--set", f"model.checkpoint={tiny_checkpoint}"]
    assert run_pipeline.main(base + ["--set", f"input.url=s3://{s3_bucket}/in",
                                     "--set", "output.url=s3://no-such-bucket-h4/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert "output.url=s3://no-such-bucket-h4/out" in err and "the bucket 'no-such-bucket-h4' does not exist" in err, err
    assert run_pipeline.main(base + ["--set", f"input.url=s3://{s3_bucket}/nothing-here",
                                     "--set", f"output.url=s3://{s3_bucket}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"input.url: nothing at s3://{s3_bucket}/nothing-here (endpoint {moto_server})" in err, err
    assert len(err.splitlines()) == 1
    s3fs_session.invalidate_cache()
    assert not s3fs_session.exists(f"{s3_bucket}/out")


def test_access_denied_exit_2(s3fs_session, s3_bucket, moto_server, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """moto's server checking credentials (as S3 does): the test's keys belong to no user, so every request is
    denied (InvalidAccessKeyId, 403)."""
    import moto.settings

    import run_pipeline

    s3fs_session.pipe_file(f"{s3_bucket}/in/a.png", tiny_image_bytes(0, "PNG"))
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    code = run_pipeline.main(["--set", "align.enabled=false", "--set", "progress=false",
                              "--set", f"storage.endpoint_url={moto_server}", "--set", f"model.checkpoint={tiny_checkpoint}",
                              "--set", f"input.url=s3://{s3_bucket}/in", "--set", f"output.url={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert f"input.url=s3://{s3_bucket}/in (endpoint {moto_server}): access denied" in err, err
    assert "credentials" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
