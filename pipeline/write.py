"""Stage 9, write: Parquet latents, a WebDataset tar of images and stats: one shard committed.

Output layout under ``output.url``::

    latents/<shard>.parquet   one row per input (per face with align.policy "all")
    images/<shard>.tar        <key>.recon.<ext> per ok row (+ <key>.aligned.<ext> with save_aligned, edits, pastes)
    stats/<shard>.json        written last: its presence is what makes the shard committed

Commit protocol: each file is written whole under a temporary name and renamed (local), or PUT as one
object (S3: a PUT or a completed multipart upload is all-or-nothing), in the order images, latents,
stats. A crash leaves at worst a latents/images file without its stats; the next run deletes those
before planning (pipeline/ledger.py), and readers that go by ``stats/`` (or wait for ``_SUCCESS``)
never see them.
"""
from __future__ import annotations

import io
import json
import posixpath
import socket
import tarfile
import time
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import OutputConfig
from .images import encode_image
from .paste import PasteBack
from .records import InvertResult, PreparedChunk, Row
from .storage import atomic_put, ensure_dir

__all__ = ["latents_schema", "build_table", "build_tar", "shard_stats", "write_shard", "finish_shard",
           "add_code_columns", "ExtraOutputs", "output_paths"]


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


def finish_shard(fs, root: str, shard_name: str, output: OutputConfig, chunks: list[PreparedChunk],
                 results: list[InvertResult | None], *, n_latent: int, stats_extra: dict,
                 metadata: dict[str, str] | None = None, max_pixels: int | None = None) -> dict:
    """Encode images, build the tables and commit. ``results[i]`` is chunk i's inversion (None: no faces).
    ``max_pixels``: the decompression-bomb limit for the originals decoded again by output.paste_back."""
    t0 = time.perf_counter()
    fmt, size, q = output.image_format, output.image_size, output.jpeg_quality
    timings: dict[str, float] = {}
    rows: list[Row] = []
    codes: list[np.ndarray | None] = []
    mse: list[float | None] = []
    psnr: list[float | None] = []
    members: list[tuple[str, bytes]] = []
    stages = None
    extra = ExtraOutputs(output, max_pixels)  # edit variants, edited codes, paste-backs
    for ch, res in zip(chunks, results):
        ch = aligned_chunk(ch, res)
        for k, v in ch.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if res is not None:
            stages = res.stages
            timings["invert"] = timings.get("invert", 0.0) + res.seconds
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
                if output.save_aligned:
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
    table = add_code_columns(build_table(rows, codes, mse, psnr, stages, n_latent, metadata), extra.codes)
    tar_bytes = build_tar(members)
    inverted = [[len(r.codes), round(r.finished_unix, 3)] for r in results if r is not None]
    stats = shard_stats(shard_name, rows, timings, {**stats_extra, "inputs_read": sum(c.n_inputs for c in chunks),
                                                    "inverted_at": inverted})
    t2 = time.perf_counter()
    stats["timings"]["write"] = round(t2 - t1, 4)  # measured before the upload; the upload adds to it
    write_shard(fs, root, shard_name, table, tar_bytes, stats)
    stats["timings"]["write"] = round(time.perf_counter() - t1, 4)
    return stats


def aligned_chunk(chunk: PreparedChunk, res: InvertResult | None) -> PreparedChunk:
    """The chunk as the dlib backend would have made it: for a chunk of photos the inversion actor aligned,
    its rows, faces and per-face originals from the actor's result (the actor's alignment time under
    "align"); other chunks unchanged."""
    if chunk.n_photos == 0:
        return chunk
    if res is None or res.rows is None:
        raise ValueError(f"chunk {chunk.index} of shard {chunk.shard}: its photos came back unaligned")
    timings = dict(chunk.timings)
    timings["align"] = timings.get("align", 0.0) + res.align_seconds
    originals = None if chunk.originals is None else [chunk.originals[p] for p in res.face_photo]
    return PreparedChunk(chunk.shard, chunk.index, res.rows, res.faces, timings, chunk.n_inputs, originals)


def add_code_columns(table: pa.Table, per_row: list[dict[str, np.ndarray]]) -> pa.Table:
    """``table`` plus one fixed-size-list column per name in ``per_row`` (one dict per row: column -> codes;
    null where a row has none): the edited codes of ``edit.save_codes``."""
    names: list[str] = []
    for cols in per_row:
        names.extend(n for n in cols if n not in names)
    for name in names:
        width = next(int(c[name].size) for c in per_row if name in c)
        table = table.append_column(name, _fixed_list([c.get(name) for c in per_row], width))
    return table


class ExtraOutputs:
    """What ``finish_shard`` adds to a shard beside the reconstructions: edited images (``<key>.<tag>.<ext>``),
    edited codes (Parquet columns ``codes_<tag>``, collected in ``codes``), and with ``output.paste_back`` the
    reconstructed and edited faces pasted into the original photo (``<key>[.<tag>].paste.<ext>``)."""

    def __init__(self, output: OutputConfig, max_pixels: int | None):
        self.fmt, self.size, self.quality = output.image_format, output.image_size, output.jpeg_quality
        self.paste = PasteBack(self.fmt, self.quality, max_pixels) if output.paste_back and self.size > 0 else None
        self.codes: list[dict[str, np.ndarray]] = []   # one dict per row: column -> codes

    def row(self, row: Row, res: InvertResult | None = None, j: int = 0,
            chunk: PreparedChunk | None = None) -> list[tuple[str, bytes]]:
        """Members for one row; ``res``/``j``: its inversion result and index there (None: not ok)."""
        cols: dict[str, np.ndarray] = {}
        self.codes.append(cols)
        if res is None:
            return []
        members: list[tuple[str, bytes]] = []
        variants = res.edits.variants if res.edits is not None else []
        for v in variants:
            if v.images is not None and self.size > 0:
                members.append((f"{row.key}.{v.tag}.{self.fmt}", encode_image(v.images[j], self.fmt, self.size, self.quality)))
            if res.edits.save_codes:
                cols[f"codes_{v.tag}"] = v.codes[j]
        originals = chunk.originals if chunk is not None else None
        if self.paste is not None and originals is not None and row.quad is not None and originals[j] is not None:
            src = self.paste.original(row.source, originals[j])
            if src is not None:
                faces = [("", res.recon[j])] + [(f".{v.tag}", v.images[j]) for v in variants if v.images is not None]
                members.extend(self.paste.member(f"{row.key}{suffix}", src, face, row.quad) for suffix, face in faces)
        return members
