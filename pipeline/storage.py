"""fsspec filesystems from URLs. s3fs takes the standard AWS credential chain; only the endpoint of an
S3-compatible server (MinIO, Ceph, a test server) comes from the config, so no secret ever sits in it."""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

try:
    from botocore.exceptions import BotoCoreError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError
except ImportError:  # botocore comes with s3fs, which only s3:// URLs need: without it no S3 error can occur
    class _NoS3Error(Exception):
        """Never raised: stands for botocore's errors where botocore is not installed."""

    BotoCoreError = ConnectTimeoutError = EndpointConnectionError = NoCredentialsError = _NoS3Error

__all__ = ["StorageError", "S3_CONNECT_TIMEOUT_S", "S3_MAX_ATTEMPTS", "storage_options", "storage_errors", "require_bucket", "get_fs",
           "join", "to_uri", "is_local", "ensure_dir", "atomic_put", "put_then_rename"]

# botocore's legacy retries (5 attempts, its own backoff) spent 9-12 s on an endpoint that refuses connections
# before the first error reached us; a run that cannot reach its storage should say so in seconds. Three
# attempts in botocore's standard mode (backoff of at most 2^attempt s with jitter), each connection given
# S3_CONNECT_TIMEOUT_S: a refused endpoint fails in about 4 s, a silent one in about 10 s. Shards that meet a
# blip mid-run are retried whole by the scheduler (`retries`).
S3_CONNECT_TIMEOUT_S = 3
S3_MAX_ATTEMPTS = 3


class StorageError(Exception):
    """Storage that a run cannot start with (credentials, endpoint, bucket, permissions): one line naming the
    config key, the URL, the endpoint and what to check. The command lines exit 2 on it."""


def storage_options(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {"config_kwargs": {"connect_timeout": S3_CONNECT_TIMEOUT_S,
                                              "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}}}
    if endpoint_url:
        # No region_name here: with a custom endpoint it breaks bucket creation on some servers.
        opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    return opts


@contextlib.contextmanager
def storage_errors(key: str, url: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn the storage failures that stop a run before it starts into one StorageError line naming ``key``,
    ``url`` and the endpoint; other errors pass through unchanged."""
    where = f"{key}={url} (endpoint {endpoint_url or 'the AWS default'})"
    try:
        yield
    except NoCredentialsError:
        raise StorageError(f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, or run where an instance role provides them") from None
    except (EndpointConnectionError, ConnectTimeoutError) as e:
        raise StorageError(f"{where}: cannot reach the endpoint after {S3_MAX_ATTEMPTS} attempts "
                           f"({S3_CONNECT_TIMEOUT_S} s connect timeout each): {e}; check storage.endpoint_url and "
                           f"that the server is up and reachable from here") from None
    except PermissionError as e:
        raise StorageError(f"{where}: access denied ({e}); check that the credentials are the right ones and "
                           f"may read (and, for output.url, write) there") from None
    except BotoCoreError as e:
        raise StorageError(f"{where}: {type(e).__name__}: {e}; check storage.endpoint_url and the credentials") from None
    except OSError as e:
        if "bucket" in str(e).lower():  # s3fs: NoSuchBucket arrives as FileNotFoundError
            raise StorageError(f"{where}: the bucket does not exist ({e}); check the URL's bucket name") from None
        raise


def require_bucket(fs: fsspec.AbstractFileSystem, path: str, key: str, url: str, endpoint_url: str | None) -> None:
    """StorageError when ``path``'s bucket does not exist on an object store (a local folder is made on use)."""
    if is_local(fs) or not hasattr(fs, "call_s3"):
        return
    bucket = path.split("/", 1)[0]
    try:
        # Not fs.exists: it answers False for missing credentials or an unreachable endpoint as well, which
        # storage_errors names better; head_bucket raises them.
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"{key}={url} (endpoint {endpoint_url or 'the AWS default'}): the bucket {bucket!r} "
                           f"does not exist; check the URL's bucket name") from None


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
