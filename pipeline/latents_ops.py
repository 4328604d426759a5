"""The work of the latents subcommands (pipeline/latents.py) over an existing latents dataset: reading codes
back, what each op makes of a shard's rows, and one input shard turned into one committed output shard;
``LatentsProcessor``, the latents actor's logic without Ray (workers/latents_worker.py runs it on Ray)."""
from __future__ import annotations

import collections
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .checkpoints import load_model, resolve_batch_size, resolve_device, use_threads
from .config import OutputConfig
from .edit import apply_direction, decode_codes, edit_variants
from .images import encode_image
from .ledger import read_committed
from .paste import PasteBack
from .read import read_sources
from .records import Row
from .storage import get_fs
from .write import add_code_columns, build_table, build_tar, shard_stats, write_shard

__all__ = ["LatentsJob", "LatentsProcessor", "latents_files", "read_shard_table", "read_codes", "shard_outputs",
           "process_shard", "PAIRS_SHARD"]

PAIRS_SHARD = "pairs"


@dataclass
class LatentsJob:
    """What every shard of a subcommand's run shares (checked on the driver, shipped once per actor call)."""
    op: str                        # decode | edit | mix | interpolate
    n_latent: int
    style_dim: int
    files: dict[str, str]          # committed input shard -> its latents path
    input_url: str
    output: OutputConfig
    endpoint_url: str | None
    max_pixels: int | None         # decompression-bomb limit for the originals of paste_back
    paste_back: bool = False
    input_image_column: str = "auto"  # the inversion run's input.image_column: where Parquet originals are
    edit: dict | None = None       # edit: pipeline.edit.make_edit_options(...)
    reference: np.ndarray | None = None  # mix: the reference row's codes
    layers: list[int] | None = None      # mix: [start, end)
    steps: int = 0                 # interpolate: images per pair
    pairs: list | None = field(default=None)  # interpolate --pair: [(key a, key b, codes a, codes b)]
    fingerprint: str = ""


def latents_files(fs, root: str) -> dict[str, str]:
    """Committed input shards: name -> latents path (a shard without stats is not there yet)."""
    committed = read_committed(fs, root)
    out = {}
    for name in sorted(committed):
        p = posixpath.join(root, "latents", f"{name}.parquet")
        out[name] = p
    return out


def read_shard_table(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _codes_of(table, n_latent: int, width: int) -> list[np.ndarray | None]:
    col = table.column("codes").combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    flat = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.float32)
    # flatten() drops the null slots: walk the valid rows in order
    out: list[np.ndarray | None] = []
    k = 0
    size = n_latent * width
    for v in valid:
        if v:
            out.append(np.asarray(flat[k * size:(k + 1) * size], np.float32).reshape(n_latent, width))
            k += 1
        else:
            out.append(None)
    return out


def read_codes(fs, files: dict[str, str], keys: list[str], n_latent: int, width: int) -> dict[str, tuple[np.ndarray, str]]:
    """key -> (codes, shard) for the given keys of ok rows, reading only the rows asked for."""
    want = set(keys)
    found: dict[str, tuple[np.ndarray, str]] = {}
    for name, path in files.items():
        t = read_shard_table(fs, path).select(["key", "status", "codes"])
        t = t.filter(pc.and_(pc.is_in(t.column("key"), value_set=_pa_array(sorted(want))), pc.equal(t.column("status"), "ok")))
        for key, codes in zip(t.column("key").to_pylist(), _codes_of(t, n_latent, width)):
            found.setdefault(key, (codes, name))
    return found


def _pa_array(values):
    return pa.array(values, pa.string())


def _rows_from_table(table) -> list[Row]:
    d = table.select(["key", "source", "face_index", "status", "error", "quad", "landmarks", "score"]).to_pylist()
    return [Row(r["key"], r["source"], r["face_index"] or 0, r["status"], r["error"], r["quad"], r["landmarks"], r["score"])
            for r in d]


def shard_outputs(job: LatentsJob, rows: list[Row], codes: list[np.ndarray | None], pairs: list | None = None):
    """-> (out rows, out codes, [(member stem, codes, index of the row in ``rows`` or None)], per-row extra
    columns) for one shard."""
    op = job.op
    out_rows, out_codes, images, extra = [], [], [], []
    if op == "interpolate":
        if pairs is None:
            ok = [(r, c) for r, c in zip(rows, codes) if r.status == "ok" and c is not None]
            pairs = [(ok[i][0].key, ok[i + 1][0].key, ok[i][1], ok[i + 1][1]) for i in range(0, len(ok) - 1, 2)]
        steps = job.steps
        for a, b, ca, cb in pairs:
            for k in range(steps):
                t = k / (steps - 1)
                c = ((1.0 - t) * ca + t * cb).astype(np.float32)
                key = f"{a}__{b}__{k}"
                out_rows.append(Row(key, f"interpolate {a} -> {b} t={t:.4g}"))
                out_codes.append(c)
                images.append((f"{key}.interp", c, None))
                extra.append({})
        return out_rows, out_codes, images, extra
    variants = edit_variants(job.edit["directions"], job.edit["alphas"]) if op == "edit" else []
    for ri, (r, c) in enumerate(zip(rows, codes)):
        cols: dict[str, np.ndarray] = {}
        extra.append(cols)
        out_rows.append(r)
        if r.status != "ok" or c is None:
            out_codes.append(None)
            continue
        if op == "decode":
            out_codes.append(c)
            images.append((f"{r.key}.recon", c, ri))
        elif op == "mix":
            i, j = job.layers
            m = c.copy()
            m[i:j] = job.reference[i:j]
            out_codes.append(m)
            images.append((f"{r.key}.mix", m, ri))
        elif op == "edit":
            out_codes.append(c)
            for tag, name, alpha in variants:
                e = apply_direction(c[None], job.edit["directions"][name], alpha, job.edit["layers"])[0]
                if job.edit["images"]:
                    images.append((f"{r.key}.{tag}", e, ri))
                if job.edit["save_codes"]:
                    cols[f"codes_{tag}"] = e
        else:
            raise ValueError(f"unknown op {op!r}")
    return out_rows, out_codes, images, extra


class _Originals:
    """output.paste_back for the subcommands: each face pasted into its original photo along the row's quad
    (``<stem>.paste.<ext>``, through pipeline/paste.py as the inversion pipeline does). The originals are read
    back from the rows' ``source`` URIs, each archive once per shard; a row whose original cannot be read or
    decoded gets no pasted image (counted in the shard's stats as ``paste_missing``, and logged). Memory: the
    shard's originals as stored (compressed), each dropped after its last row, and one decoded photo at a time
    (a row's images come one after another)."""

    def __init__(self, rows: list[Row], images: list, job: LatentsJob):
        self.rows = rows
        self.paste = PasteBack(job.output.image_format, job.output.jpeg_quality, job.max_pixels)
        wanted = sorted({ri for _, _, ri in images if ri is not None and rows[ri].quad is not None})
        self.data = read_sources([rows[ri].source for ri in wanted], job.endpoint_url, job.input_image_column)
        # Rows still to come per original (faces of one photo share it with align.policy: all).
        self.left = collections.Counter(rows[ri].source for ri in wanted)
        self.last_row: int | None = None
        self.missing_rows: set[int] = set()

    def _original(self, ri: int) -> np.ndarray | None:
        source = self.rows[ri].source
        if ri != self.last_row:
            self.last_row = ri
            self.left[source] -= 1
        img = self.paste.original(source, self.data.get(source))
        if self.left[source] == 0:
            self.data.pop(source, None)  # its last row: the bytes are no longer needed
        return img

    def members(self, stem: str, ri: int | None, face: np.ndarray) -> list[tuple[str, bytes]]:
        if ri is None or self.rows[ri].quad is None:
            return []
        src = self._original(ri)
        if src is None:
            self.missing_rows.add(ri)
            return []
        return [self.paste.member(stem, src, face, self.rows[ri].quad)]


def process_shard(model, shard: str, job: LatentsJob, batch_size: int = 16) -> dict:
    """One input shard -> one committed output shard, with ``model`` (an E2Style) decoding the codes."""
    t0 = time.perf_counter()
    n_latent, width = job.n_latent, job.style_dim
    fs_in, _ = get_fs(job.input_url, job.endpoint_url)
    fs_out, out_root = get_fs(job.output.url, job.endpoint_url)
    if shard == PAIRS_SHARD and job.pairs is not None:
        rows, codes, stages = [], [], None
        pairs = job.pairs
    else:
        table = read_shard_table(fs_in, job.files[shard])
        rows, codes = _rows_from_table(table), _codes_of(table, n_latent, width)
        st = [s for s in table.column("stages").to_pylist() if s is not None]
        stages = st[0] if st else None
        pairs = None
    t1 = time.perf_counter()
    out_rows, out_codes, images, extra = shard_outputs(job, rows, codes, pairs)
    fmt, size, q = job.output.image_format, job.output.image_size, job.output.jpeg_quality
    members = []
    t_dec = 0.0
    originals = _Originals(rows, images, job) if size > 0 and job.paste_back else None
    if size > 0:
        for i in range(0, len(images), batch_size):
            part = images[i:i + batch_size]
            td = time.perf_counter()
            px = decode_codes(model, np.stack([c for _, c, _ in part]), batch_size)
            t_dec += time.perf_counter() - td
            for (stem, _, ri), im in zip(part, px):
                members.append((f"{stem}.{fmt}", encode_image(im, fmt, size, q)))
                if originals is not None:
                    members.extend(originals.members(stem, ri, im))
    t2 = time.perf_counter()
    md = {"fingerprint": job.fingerprint, "style_dim": str(width), "op": job.op}
    if stages is not None:
        md["stages"] = str(stages)
    none = [None] * len(out_rows)
    table = add_code_columns(build_table(out_rows, out_codes, none, none, stages, n_latent, md), extra)
    tar = build_tar(members)
    info = {"op": job.op, "fingerprint": job.fingerprint, "input": job.files.get(shard),
            "n_latent": n_latent, "images": len(members)}
    if originals is not None:
        info["paste_missing"] = len(originals.missing_rows)  # rows whose original could not be read or decoded
    stats = shard_stats(shard, out_rows, {"read": t1 - t0, "decode_latents": t_dec, "encode": t2 - t1 - t_dec}, info)
    write_shard(fs_out, out_root, shard, table, tar, stats)
    stats["timings"]["write"] = round(time.perf_counter() - t2, 4)
    return stats


class LatentsProcessor:
    """The generator loaded once (device, precision, threads by the pipeline's rules: pipeline/checkpoints.py),
    then one call per shard."""

    def __init__(self, checkpoint: str, *, endpoint_url: str | None = None, sha256: str | None = None,
                 precision: str = "auto", device: str = "auto", num_threads: int | None = None,
                 batch_size: int | str = "auto"):
        self.device = resolve_device(device)
        use_threads(num_threads)
        self.model = load_model(checkpoint, self.device, precision=precision, endpoint_url=endpoint_url, sha256=sha256)
        self.batch_size = resolve_batch_size(batch_size, self.device)

    def info(self) -> dict:
        m = self.model
        return {"n_latent": int(m.n_latent), "style_dim": int(m.decoder.style_dim), "device": self.device}

    def process(self, shard: str, job: LatentsJob) -> dict:
        return process_shard(self.model, shard, job, self.batch_size)
