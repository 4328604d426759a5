"""fsspec filesystems from URLs. s3fs takes the standard AWS credential chain; only the endpoint of an
S3-compatible server (MinIO, Ceph, a test server) comes from the config, so no secret ever sits in it."""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["storage_options", "get_fs", "join", "to_uri", "is_local", "ensure_dir", "atomic_put",
           "put_then_rename"]


def storage_options(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    if url.startswith(("s3://", "s3a://")) and endpoint_url:
        # No region_name here: with a custom endpoint it breaks bucket creation on some servers.
        return {"client_kwargs": {"endpoint_url": endpoint_url}}
    return {}


def get_fs(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol). Local paths come back absolute."""
    fs, path = url_to_fs(url, **storage_options(url, endpoint_url))
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protos or "local" in protos


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for humans and the ``source`` column: s3://bucket/key, or a plain local path."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def ensure_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # Object stores have no directories; creating "bucket/prefix" on s3fs may try to make a bucket.
    if is_local(fs):
        fs.makedirs(path, exist_ok=True)


def atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` either does not exist or holds all of it.

    Local: write a temporary sibling, fsync, rename (atomic on POSIX). Object stores: a single PUT is
    already all-or-nothing, nothing partial is ever listed.
    """
    if is_local(fs):
        d = posixpath.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = posixpath.join(d, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def put_then_rename(fs: fsspec.AbstractFileSystem, tmp_path: str, final_path: str) -> None:
    """Move a fully written temporary object to its final name."""
    if is_local(fs):
        os.makedirs(posixpath.dirname(final_path), exist_ok=True)
        os.replace(tmp_path, final_path)
    else:
        # S3 copy is atomic per object: readers see the old object or the whole new one.
        fs.copy(tmp_path, final_path)
        fs.rm_file(tmp_path)
