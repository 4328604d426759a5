"""Stage 1, read: list the input, plan shards, and read a shard's raw samples.

Three input formats, one shard notion:
  * webdataset: one ``.tar`` (img2dataset layout: ``<key>.jpg`` beside ``<key>.json``/``.txt``) is one shard;
  * parquet: one ``.parquet`` file with an image-bytes column is one shard;
  * images: a folder/prefix of jpg/jpeg/png/webp files (recursive), grouped into shards of ``shard_size``.

Image-folder shards must keep their identity when files are added later, or an incremental run would
redo (and duplicate) finished work. So membership is not recomputed from scratch: committed shards
record the files they hold (``stats/<shard>.json`` ``inputs``), planning takes those as they are and only
groups the files nobody holds yet into new shards, numbered from the lowest free number. With an
unchanged input the plan is a pure function of (listing, committed shards), so a crashed run and its
rerun plan the same shards.

Readers never raise for bad bytes: a sample that cannot be read becomes an ``InputItem`` with an error
status, so one broken file costs one row, not the shard.
"""
from __future__ import annotations

import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from .storage import get_fs, to_uri

__all__ = ["IMAGE_EXTS", "Shard", "InputItem", "list_inputs", "detect_format", "plan_shards", "read_sources",
           "read_shard", "sanitize_key", "shard_name_for"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAR_EXTS = ("tar",)
_PARQUET_EXTS = ("parquet",)
_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
_KEY_COLUMNS = ("key", "__key__", "id")
_READ_BATCH = 32  # files fetched concurrently from object storage by s3fs's cat


@dataclass
class Shard:
    name: str            # output shard name: latents/<name>.parquet, images/<name>.tar, stats/<name>.json
    format: str          # images | webdataset | parquet
    uri: str             # the tar/parquet file, or the input root for image folders
    paths: list[str]     # filesystem paths: the file itself, or the image files of the shard
    root: str            # input root path (keys are relative to it for image folders)
    committed: bool = False

    @property
    def num_inputs(self) -> int | None:
        return len(self.paths) if self.format == "images" else None


@dataclass
class InputItem:
    key: str
    source: str                      # URI of the file, or "<tar uri>#<member>" / "<parquet uri>#row=<i>"
    data: bytes | None = None
    status: str | None = None        # None when data is there; else read_error | empty_file | no_image
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_key(key: str) -> str:
    """A key that is safe as a tar member prefix and as a WebDataset key.

    No absolute paths, no ``.``/``..`` components, no dots inside a component (WebDataset splits the key
    from the extension at the first dot of the basename), no control or odd characters.
    """
    parts = [p for p in str(key).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [_KEY_BAD.sub("_", p) for p in parts]
    parts = [p for p in parts if p.strip("_")] or ["_"]
    return "/".join(parts)


def shard_name_for(rel_path: str) -> str:
    """Output shard name for a tar/parquet file: its path relative to the input root, flattened."""
    stem = rel_path
    for ext in (".tar", ".parquet"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    return "__".join(_KEY_BAD.sub("_", p) for p in stem.split("/") if p not in ("", ".", "..")) or "_"


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _is_hidden(rel: str) -> bool:
    # Dot files and folders (.DS_Store, editors' and uploaders' temporaries) are never inputs.
    return any(p.startswith(".") for p in rel.split("/"))


def list_inputs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """All files under ``root`` (recursive), sorted; ``root`` itself when it is a file."""
    if fs.isfile(root):
        return [root]
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {root}")
    files = fs.find(root, withdirs=False)
    out = []
    for p in files:
        rel = posixpath.relpath(p, root)
        if not _is_hidden(rel):
            out.append(p)
    return sorted(out)


def detect_format(files: list[str], fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    exts = {_ext(p) for p in files}
    has_tar, has_pq = bool(exts & set(_TAR_EXTS)), bool(exts & set(_PARQUET_EXTS))
    if has_tar and has_pq:
        raise ValueError("input holds both .tar and .parquet files; set input.format")
    if has_tar:
        return "webdataset"
    if has_pq:
        return "parquet"
    return "images"


def _rel(root: str, path: str, is_file_root: bool) -> str:
    return posixpath.basename(path) if is_file_root else posixpath.relpath(path, root)


def plan_shards(fs: fsspec.AbstractFileSystem, root: str, fmt: str, shard_size: int,
                committed: dict[str, dict] | None = None, files: list[str] | None = None) -> tuple[str, list[Shard]]:
    """(resolved format, shards). ``committed`` maps shard name -> its stats record (with ``inputs``)."""
    committed = committed or {}
    files = list_inputs(fs, root) if files is None else files
    fmt = detect_format(files, fmt)
    is_file_root = len(files) == 1 and files[0] == root
    base = posixpath.dirname(root) if is_file_root else root
    shards: list[Shard] = []
    if fmt in ("webdataset", "parquet"):
        exts = _TAR_EXTS if fmt == "webdataset" else _PARQUET_EXTS
        for p in files:
            if _ext(p) not in exts:
                continue
            name = shard_name_for(_rel(root, p, is_file_root))
            shards.append(Shard(name, fmt, to_uri(fs, p), [p], base, committed=name in committed))
        return fmt, shards

    images = [p for p in files if _ext(p) in IMAGE_EXTS]
    held: set[str] = set()
    for name, st in committed.items():
        if st.get("format") == "images":
            rels = st.get("inputs") or []
            held.update(rels)
            shards.append(Shard(name, "images", to_uri(fs, base), [posixpath.join(base, r) for r in rels], base,
                                committed=True))
    todo = [p for p in images if _rel(base, p, False) not in held]
    used = {int(s.name.split("-")[1]) for s in shards if re.fullmatch(r"images-\d+", s.name)}
    n = 0
    for i in range(0, len(todo), shard_size):
        while n in used:
            n += 1
        used.add(n)
        shards.append(Shard(f"images-{n:06d}", "images", to_uri(fs, base), todo[i:i + shard_size], base))
    shards.sort(key=lambda s: s.name)
    return fmt, shards


def read_shard(fs: fsspec.AbstractFileSystem, shard: Shard, *, image_column: str = "auto",
               key_column: str = "auto") -> Iterator[InputItem]:
    if shard.format == "images":
        yield from _read_images(fs, shard)
    elif shard.format == "webdataset":
        yield from _read_tar(fs, shard)
    elif shard.format == "parquet":
        yield from _read_parquet(fs, shard, image_column, key_column)
    else:
        raise ValueError(f"unknown input format {shard.format!r}")


def _read_images(fs, shard: Shard) -> Iterator[InputItem]:
    for i in range(0, len(shard.paths), _READ_BATCH):
        batch = shard.paths[i:i + _READ_BATCH]
        # on_error="return": a vanished or unreadable file is one row's problem, not the shard's.
        got = fs.cat(batch, on_error="return") if len(batch) > 1 else {batch[0]: _cat_one(fs, batch[0])}
        for p in batch:
            rel = posixpath.relpath(p, shard.root)
            key = sanitize_key(rel.rsplit(".", 1)[0])
            data = got.get(p)
            if isinstance(data, BaseException) or data is None:
                yield InputItem(key, to_uri(fs, p), None, "read_error", f"{type(data).__name__}: {data}")
            else:
                yield InputItem(key, to_uri(fs, p), bytes(data))


def _cat_one(fs, p):
    try:
        return fs.cat_file(p)
    except Exception as e:  # noqa: BLE001 - reported as the row's status
        return e


def _split_member(name: str) -> tuple[str, str]:
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _read_tar(fs, shard: Shard) -> Iterator[InputItem]:
    uri = shard.uri
    cur_key: str | None = None
    members: dict[str, tuple[str, bytes]] = {}

    def flush() -> Iterator[InputItem]:
        if cur_key is None:
            return
        key = sanitize_key(cur_key)
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"][1].decode("utf-8"))
                meta = meta if isinstance(meta, dict) else {"json": meta}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        if "txt" in members:
            meta["caption"] = members["txt"][1].decode("utf-8", "replace")
        for ext in IMAGE_EXTS:
            if ext in members:
                name, data = members[ext]
                yield InputItem(key, f"{uri}#{name}", data, meta=meta)
                return
        names = ", ".join(sorted(n for n, _ in members.values()))
        yield InputItem(key, f"{uri}#{cur_key}", None, "no_image", f"no image member among: {names}", meta)

    # Stream the archive (mode "r|*"): a 1 GB shard is never held or seeked in full.
    with fs.open(shard.paths[0], "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_member(m.name)
                    if key != cur_key:
                        yield from flush()
                        cur_key, members = key, {}
                    fobj = tf.extractfile(m)
                    members[ext] = (m.name, fobj.read() if fobj else b"")
            yield from flush()
        except (tarfile.TarError, EOFError, ValueError) as e:
            # A truncated or corrupt archive: keep what was read whole; the sample being read when it
            # broke gets the read_error (or, if it was complete, a row of its own says so).
            msg = f"archive ends or breaks here: {type(e).__name__}: {e}"
            if cur_key is not None and not any(x in members for x in IMAGE_EXTS):
                yield InputItem(sanitize_key(cur_key), f"{uri}#{cur_key}", None, "read_error", msg)
            else:
                yield from flush()
                yield InputItem("_archive_error", uri, None, "read_error", msg)


def _pick(names: list[str], wanted: str, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    if wanted != "auto":
        if wanted not in names:
            raise ValueError(f"{path}: no column {wanted!r} ({what}); columns: {names}")
        return wanted
    for c in candidates:
        if c in names:
            return c
    return None


def _read_parquet(fs, shard: Shard, image_column: str, key_column: str) -> Iterator[InputItem]:
    import pyarrow.parquet as pq

    uri = shard.uri
    with fs.open(shard.paths[0], "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - not a parquet file at all: one row says so
            yield InputItem("_file_error", uri, None, "read_error", f"{type(e).__name__}: {e}")
            return
        names = pf.schema_arrow.names
        img_col = _pick(names, image_column, _IMAGE_COLUMNS, "input.image_column", uri)
        if img_col is None:
            raise ValueError(f"{uri}: no image column (looked for {', '.join(_IMAGE_COLUMNS)}); "
                             f"set input.image_column; columns: {names}")
        key_col = _pick(names, key_column, _KEY_COLUMNS, "input.key_column", uri)
        cols = [img_col] + ([key_col] if key_col else [])
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=64, columns=cols):
                imgs = batch.column(img_col).to_pylist()
                keys = batch.column(key_col).to_pylist() if key_col else [None] * len(imgs)
                for v, k in zip(imgs, keys):
                    key = sanitize_key(str(k) if k is not None else f"{row:09d}")
                    src = f"{uri}#row={row}"
                    if isinstance(v, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
                        v = v.get("bytes")
                    if v is None:
                        yield InputItem(key, src, None, "empty_file", "null image bytes")
                    elif isinstance(v, str):
                        yield InputItem(key, src, None, "read_error", "image column holds text, not bytes")
                    else:
                        yield InputItem(key, src, bytes(v))
                    row += 1
        except OSError as e:
            if "corrupt" in str(e).lower() or "invalid" in str(e).lower():
                yield InputItem("_file_error", uri, None, "read_error", f"{type(e).__name__}: {e}")
            else:
                raise


def read_sources(sources: list[str], endpoint_url: str | None = None,
                 image_column: str = "auto") -> dict[str, bytes | Exception]:
    """The input bytes behind rows' ``source`` URIs (a file, ``<tar>#<member>`` or ``<parquet>#row=<i>``, as
    ``read_shard`` names them), each archive or Parquet file read once. A source that cannot be read maps to
    its exception (one row's problem, not the caller's)."""
    import pyarrow.parquet as pq

    groups: dict[str, list[tuple[str, str | None]]] = {}
    for s in dict.fromkeys(sources):
        uri, sep, frag = s.partition("#")
        if not sep or _ext(uri) not in ("tar", "parquet"):
            uri, frag = s, None  # a plain file (whose name may hold a '#')
        groups.setdefault(uri, []).append((s, frag))
    out: dict[str, bytes | Exception] = {}
    for uri, items in groups.items():
        try:
            fs, path = get_fs(uri, endpoint_url)
            if items[0][1] is None:
                out[items[0][0]] = fs.cat_file(path)
            elif _ext(path) == "parquet":
                with fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    col = _pick(pf.schema_arrow.names, image_column, _IMAGE_COLUMNS, "input.image_column", uri)
                    values = pf.read(columns=[col]).column(col) if col else None
                for s, frag in items:
                    v = values[int(frag[len("row="):])].as_py() if values is not None else None
                    v = v.get("bytes") if isinstance(v, dict) else v
                    out[s] = bytes(v) if isinstance(v, (bytes, bytearray)) else LookupError(f"{s}: no image bytes")
            else:  # a tar: one streaming pass for all wanted members
                wanted = {frag: s for s, frag in items}
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                    for m in tf:
                        if m.name in wanted and m.isfile():
                            fobj = tf.extractfile(m)
                            out[wanted[m.name]] = fobj.read() if fobj else b""
        except Exception as e:  # noqa: BLE001 - reported per source
            for s, _ in items:
                out.setdefault(s, e)
        for s, _ in items:
            out.setdefault(s, FileNotFoundError(f"{s}: not found"))
    return out
