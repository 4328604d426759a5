"""Bad input never kills a job: every broken, odd or hostile input becomes a row with its status."""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.inputs import make_parquet, make_tar, pipeline_config, tiny_image_bytes
from pipeline.failures import format_failures
from pipeline.prepare import prepare_item
from pipeline.read import InputItem
from pipeline.runner import run


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected status) with alignment off."""
    good = tiny_image_bytes(1)
    rgba = np.dstack([np.full((20, 20, 3), 200, np.uint8), np.full((20, 20), 128, np.uint8)])
    cmyk = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).convert("CMYK").save(cmyk, format="JPEG")
    im16 = Image.fromarray((np.arange(400, dtype=np.uint16).reshape(20, 20) * 150))
    buf16 = io.BytesIO()
    im16.save(buf16, format="PNG")
    big = io.BytesIO()
    Image.new("1", (400, 400)).save(big, format="PNG")  # 160k pixels > input.max_pixels in the test
    return {
        "good": (good, "ok"),
        "zero_bytes": (b"", "empty_file"),
        "truncated": (good[: len(good) // 2], "decode_error"),
        "text_named_jpg": (b"this is not an image at all\n" * 10, "decode_error"),
        "html_page": (b"<html><body>404 not found</body></html>", "decode_error"),
        "cmyk": (cmyk.getvalue(), "ok"),
        "gray16": (buf16.getvalue(), "ok"),
        "rgba": (_png(rgba, "RGBA"), "ok"),
        "bomb": (big.getvalue(), "decompression_bomb"),
    }


@pytest.mark.ray
def test_bad_inputs_one_row_each_s3(ray_session, s3fs_session, s3_bucket, moto_server, tiny_checkpoint, caplog):
    """One row per input whatever its bytes; the summary names the inputs that failed (all of them in
    failures.jsonl), and its throughput is the one the last progress line shows."""
    fs = s3fs_session
    corpus = _corpus()
    for name, (data, _) in corpus.items():
        fs.pipe_file(f"{s3_bucket}/in/{name}.{'png' if name in ('rgba', 'gray16', 'bomb') else 'jpg'}", data)
    cfg = pipeline_config(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server,
                          input__max_pixels=100_000, shard_size=5)
    echoed: list[str] = []
    with caplog.at_level(logging.INFO, logger="e2style.progress"):
        res = run(cfg, echo=echoed.append)
    assert res.exit_code == 0
    fs.invalidate_cache()
    df = pd.concat([pd.read_parquet(fs.open(p)) for p in fs.glob(f"{s3_bucket}/out/latents/*.parquet")])
    got = dict(zip(df.key, df.status))
    assert got == {k: v[1] for k, v in corpus.items()}
    bad = df[df.status != "ok"]
    assert bad.codes.isna().all() and bad.error.notna().all() and bad.recon_psnr.isna().all()
    assert df[df.status == "ok"].error.isna().all()
    assert res.summary["counts"]["ok"] == 4

    # The failed inputs: every one in failures.jsonl, each in the summary with its status and error.
    listed = [json.loads(line) for line in fs.cat_file(f"{s3_bucket}/out/failures.jsonl").decode().splitlines()]
    assert {r["key"]: (r["status"], r["error"], r["source"]) for r in listed} == \
        {r.key: (r.status, r.error, r.source) for r in bad.itertuples()}
    summary = echoed[-1]
    assert f"inputs that failed in this run: {len(bad)} (all in s3://{s3_bucket}/out/failures.jsonl)" in summary
    for r in bad.itertuples():
        assert f"{r.status:<13} {r.source}: {r.error.splitlines()[0][:160]}" in summary, summary

    # One throughput: the last progress line (all inputs committed, none in flight) and the summary.
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")][-1]
    assert last.startswith(f"progress: {len(corpus)}/{len(corpus)} images committed") and "0 in flight" in last, last
    rate = re.search(r"([\d.]+ images/s)", last).group(1)
    assert f"throughput: {rate}" in summary, (last, summary)

    # A rerun that commits nothing keeps the list of the shards still committed.
    res = run(cfg, echo=echoed.append)
    assert res.exit_code == 0 and not res.committed
    fs.invalidate_cache()
    assert [json.loads(line) for line in fs.cat_file(f"{s3_bucket}/out/failures.jsonl").decode().splitlines()] == listed


@pytest.mark.ray
def test_hostile_tar_and_parquet(ray_session, s3fs_session, s3_bucket, moto_server, tiny_checkpoint):
    """Member names that try to escape the archive, a truncated tar, a null image in Parquet."""
    fs = s3fs_session
    ok = tiny_image_bytes(3)
    tar = make_tar({"000001": ok}, extra=[("../../evil.jpg", ok), ("/abs/root.jpg", ok),
                                          ("dir/../up.jpg", ok), ("000002.json", b"{broken json")])
    fs.pipe_file(f"{s3_bucket}/in/00000.tar", tar)
    full = make_tar({f"1{i:05d}": tiny_image_bytes(10 + i) for i in range(4)})
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        last = tf.getmember("100003.jpg")
    fs.pipe_file(f"{s3_bucket}/in/00001.tar", full[: last.offset_data + last.size // 2])  # cut mid-member
    res = run(pipeline_config(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server),
              echo=lambda s: None)
    assert res.exit_code == 0, res.failed
    fs.invalidate_cache()
    df0 = pd.read_parquet(fs.open(f"{s3_bucket}/out/latents/00000.parquet"))
    assert set(df0.key) == {"000001", "evil", "abs/root", "dir/up", "000002"}
    assert dict(zip(df0.key, df0.status))["000002"] == "no_image"
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{s3_bucket}/out/images/00000.tar"))) as tf:
        names = tf.getnames()
    assert names and all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    df1 = pd.read_parquet(fs.open(f"{s3_bucket}/out/latents/00001.parquet"))
    assert dict(zip(df1.key, df1.status)) == {"100000": "ok", "100001": "ok", "100002": "ok",
                                              "100003": "read_error"}

    pq_bytes = make_parquet({"k0": ok, "k1": ok}, "huggingface")
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = pq.read_table(io.BytesIO(pq_bytes))
    t = t.set_column(1, "image", pa.array([{"bytes": ok, "path": "a"}, {"bytes": None, "path": "b"}],
                                          t.schema.field("image").type))
    sink = io.BytesIO()
    pq.write_table(t, sink)
    fs.pipe_file(f"{s3_bucket}/pq/x.parquet", sink.getvalue())
    res = run(pipeline_config(f"s3://{s3_bucket}/pq", f"s3://{s3_bucket}/out2", tiny_checkpoint, moto_server),
              echo=lambda s: None)
    assert res.exit_code == 0
    df = pd.read_parquet(fs.open(f"{s3_bucket}/out2/latents/x.parquet"))
    assert dict(zip(df.key, df.status)) == {"k0": "ok", "k1": "empty_file"}


def test_prepare_item_never_raises_for_bad_bytes():
    cfg = pipeline_config("/in", "/out", "/ck.pt")
    for name, (data, status) in _corpus().items():
        if name == "bomb":
            continue
        rows = prepare_item(InputItem(name, f"/in/{name}", data), cfg.prepare, {})
        assert [r.status for r, _ in rows] == [status], name
        face = rows[0][1]
        assert (face is None) == (status != "ok")
        if face is not None:
            assert face.shape == (256, 256, 3) and face.dtype == np.uint8


@pytest.mark.ray
@pytest.mark.slow
def test_failing_shard_is_retried_then_reported(ray_session, s3fs_session, s3_bucket, moto_server, tiny_checkpoint,
                                                caplog):
    """A shard that fails on every attempt (a Parquet file without any image column) is attempted 1 + retries
    times, then the job ends non-zero naming the shard, and every other shard is committed (at its first try)."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = s3fs_session
    fs.pipe_file(f"{s3_bucket}/in/good.parquet", make_parquet({"a": tiny_image_bytes(1)}))
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["no images here"]}), sink)
    fs.pipe_file(f"{s3_bucket}/in/bad.parquet", sink.getvalue())
    with caplog.at_level(logging.INFO, logger="e2style"):
        res = run(pipeline_config(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_checkpoint, moto_server,
                                  retries=2), echo=lambda s: None)
    assert res.exit_code == 1
    assert list(res.failed) == ["bad"] and "no image column" in res.failed["bad"]
    assert res.committed == ["good"]
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("e2style")]
    assert [m for m in msgs if m.startswith("shard bad failed")] == [
        f"shard bad failed (attempt 1), retrying: {res.failed['bad']}",
        f"shard bad failed (attempt 2), retrying: {res.failed['bad']}",
        f"shard bad failed after 3 attempt(s): {res.failed['bad']}"]
    assert not [m for m in msgs if m.startswith("shard good failed")]
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/out/_SUCCESS")
    st = json.loads(fs.cat_file(f"{s3_bucket}/out/stats/good.json"))
    assert st["attempt"] == 1


def test_summary_lists_failed_inputs_up_to_a_bound():
    failures = [{"shard": "s", "key": f"k{i}", "source": f"/in/k{i}.jpg", "status": "decode_error",
                 "error": f"cannot identify image {i}\nsecond line"} for i in range(25)]
    lines = format_failures(failures, "/out/failures.jsonl", shown=20)
    assert lines[0] == "inputs that failed in this run: 25 (all in /out/failures.jsonl)"
    assert lines[1] == "  decode_error  /in/k0.jpg: cannot identify image 0"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 5 more in /out/failures.jsonl"
    assert format_failures([], "/out/failures.jsonl") == []
