"""Stage 6, write: Parquet latents, a WebDataset tar of images, stats, and the commit protocol.

Output layout under ``output.url``::

    latents/<shard>.parquet   one row per input (per face with align.policy "all")
    images/<shard>.tar        <key>.recon.<ext> per ok row (+ <key>.aligned.<ext> with save_aligned)
    stats/<shard>.json        written last: its presence is what makes the shard committed
    _run.json                 resolved config (secrets redacted), checkpoint sha256, versions, start/end
    _SUCCESS                  every planned shard committed

Commit protocol: each file is written whole under a temporary name and renamed (local), or PUT as one
object (S3: a PUT or a completed multipart upload is all-or-nothing), in the order images, latents,
stats. A crash leaves at worst a latents/images file without its stats; the next run deletes those
before planning (``clean_uncommitted``), and readers that go by ``stats/`` (or wait for ``_SUCCESS``)
never see them.
"""
from __future__ import annotations

import io
import json
import posixpath
import socket
import tarfile
import time
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .invert import InvertResult
from .prepare import PreparedChunk, Row
from .edit import ExtraOutputs
from .storage import atomic_put, ensure_dir, is_local

__all__ = ["latents_schema", "build_table", "encode_image", "build_tar", "shard_stats", "write_shard",
           "finish_shard", "read_committed", "clean_uncommitted", "read_run_record", "write_run_record",
           "clear_outputs", "mark_success", "clear_success", "output_paths"]

_EXT_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def output_paths(root: str, shard: str) -> dict[str, str]:
    return {
        "latents": posixpath.join(root, "latents", f"{shard}.parquet"),
        "images": posixpath.join(root, "images", f"{shard}.tar"),
        "stats": posixpath.join(root, "stats", f"{shard}.json"),
    }


def code_width(metadata: dict[str, str] | None) -> int:
    """The generator's style dimension (512 for StyleGAN2 FFHQ; the runner puts the model's in metadata)."""
    return int((metadata or {}).get("style_dim", 512))


def latents_schema(n_latent: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    width = code_width(metadata)
    md = {"codes_shape": json.dumps([n_latent, width]), "codes_layout": f"row-major (n_latent, {width}), W+"}
    md.update(metadata or {})
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("face_index", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("codes", pa.list_(pa.float32(), n_latent * width)),
        pa.field("stages", pa.int32()),
        pa.field("quad", pa.list_(pa.float32(), 8)),
        pa.field("landmarks", pa.list_(pa.float32(), 136)),
        pa.field("score", pa.float32()),
        pa.field("recon_mse", pa.float32()),
        pa.field("recon_psnr", pa.float32()),
    ], metadata=md)


def _fixed_list(rows_values: list[np.ndarray | list | None], size: int) -> pa.FixedSizeListArray:
    n = len(rows_values)
    flat = np.zeros((n, size), np.float32)
    mask = np.ones(n, bool)
    for i, v in enumerate(rows_values):
        if v is not None:
            flat[i] = np.asarray(v, np.float32).reshape(-1)
            mask[i] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size, mask=pa.array(mask))


def build_table(rows: list[Row], codes: list[np.ndarray | None], mse: list[float | None],
                psnr: list[float | None], stages: int | None, n_latent: int,
                metadata: dict[str, str] | None = None) -> pa.Table:
    schema = latents_schema(n_latent, metadata)
    ok = [c is not None for c in codes]
    cols = {
        "key": pa.array([r.key for r in rows], pa.string()),
        "source": pa.array([r.source for r in rows], pa.string()),
        "face_index": pa.array([r.face_index for r in rows], pa.int32()),
        "status": pa.array([r.status for r in rows], pa.string()),
        "error": pa.array([r.error for r in rows], pa.string()),
        "codes": _fixed_list(codes, n_latent * code_width(metadata)),
        "stages": pa.array([stages if o else None for o in ok], pa.int32()),
        "quad": _fixed_list([r.quad for r in rows], 8),
        "landmarks": _fixed_list([r.landmarks for r in rows], 136),
        "score": pa.array([r.score for r in rows], pa.float32()),
        "recon_mse": pa.array(mse, pa.float32()),
        "recon_psnr": pa.array(psnr, pa.float32()),
    }
    return pa.Table.from_pydict(cols, schema=schema)


def encode_image(img: np.ndarray, fmt: str = "jpg", size: int | None = None, quality: int = 95) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(img), "RGB")
    if size and (im.width != size or im.height != size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality} if fmt in ("jpg", "webp") else {"compress_level": 6}
    im.save(buf, format=_EXT_FORMAT[fmt], **kw)
    return buf.getvalue()


def build_tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar; names were built from sanitised keys, checked again here all the same."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"unsafe tar member name {name!r}")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # reproducible archives: the same shard gives the same bytes
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_stats(shard_name: str, rows: list[Row], timings: dict[str, float], extra: dict) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {"shard": shard_name, "rows": len(rows), "counts": counts,
            "timings": {k: round(v, 4) for k, v in sorted(timings.items())}, **extra}


def write_shard(fs, root: str, shard_name: str, table: pa.Table, tar_bytes: bytes, stats: dict) -> None:
    """Commit one shard: images, then latents, then stats (the commit marker)."""
    paths = output_paths(root, shard_name)
    for d in ("latents", "images", "stats"):
        ensure_dir(fs, posixpath.join(root, d))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    atomic_put(fs, paths["images"], tar_bytes)
    atomic_put(fs, paths["latents"], buf.getvalue().to_pybytes())
    stats = dict(stats, committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), committed_unix=round(time.time(), 3),
                 host=socket.gethostname())
    atomic_put(fs, paths["stats"], json.dumps(stats, indent=1, default=str).encode())


def finish_shard(fs, root: str, shard_name: str, cfg: dict, chunks: list[PreparedChunk],
                 results: list[InvertResult | None], *, n_latent: int, stats_extra: dict,
                 metadata: dict[str, str] | None = None) -> dict:
    """Encode images, build the tables and commit. ``results[i]`` is chunk i's inversion (None: no faces)."""
    t0 = time.perf_counter()
    out = cfg["output"]
    fmt, size, q = out["image_format"], out["image_size"], out["jpeg_quality"]
    timings: dict[str, float] = {}
    rows: list[Row] = []
    codes: list[np.ndarray | None] = []
    mse: list[float | None] = []
    psnr: list[float | None] = []
    members: list[tuple[str, bytes]] = []
    stages = None
    extra = ExtraOutputs(cfg)  # edit variants, edited codes, paste-backs (pipeline/edit.py)
    for ch, res in zip(chunks, results):
        for k, v in ch.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if res is not None:
            stages = res.stages
            timings["invert"] = timings.get("invert", 0.0) + getattr(res, "seconds", 0.0)
        j = 0  # index into this chunk's faces / inversion results
        for r in ch.rows:
            rows.append(r)
            if r.status == "ok":
                codes.append(res.codes[j])
                if size > 0:
                    mse.append(float(res.mse[j]))
                    psnr.append(float(res.psnr[j]))
                    members.append((f"{r.key}.recon.{fmt}", encode_image(res.recon[j], fmt, size, q)))
                else:  # latents only: no reconstruction was made, so none is measured
                    mse.append(None)
                    psnr.append(None)
                if out["save_aligned"]:
                    members.append((f"{r.key}.aligned.{fmt}", encode_image(ch.faces[j], fmt, size, q)))
                members.extend(extra.row(r, res, j, ch))
                j += 1
            else:
                extra.row(r)
                codes.append(None)
                mse.append(None)
                psnr.append(None)
    t1 = time.perf_counter()
    timings["encode"] = t1 - t0
    table = extra.extend_table(build_table(rows, codes, mse, psnr, stages, n_latent, metadata))
    tar_bytes = build_tar(members)
    inverted = [[len(r.codes), round(r.finished_unix, 3)] for r in results if r is not None]
    stats = shard_stats(shard_name, rows, timings, {**stats_extra, "inputs_read": sum(c.n_inputs for c in chunks),
                                                    "inverted_at": inverted})
    t2 = time.perf_counter()
    stats["timings"]["write"] = round(t2 - t1, 4)  # measured before the upload; the upload adds to it
    write_shard(fs, root, shard_name, table, tar_bytes, stats)
    stats["timings"]["write"] = round(time.perf_counter() - t1, 4)
    return stats


# ----------------------------------------------------------------------------------------------------
# Output-level bookkeeping (driver side)


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
