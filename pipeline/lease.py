"""One writer per output: the lease (``_lease.json`` under output.url) held by the run that writes there.

Scheduled runs overlap, and a second run's cleanup of uncommitted files would delete the files the first is
writing. So a run takes the output's lease before its first write and keeps it live with a heartbeat; another
run finding a live lease is refused (or waits, ``output.lease_wait_s``); a dead holder's lease is taken over by
exactly one run. Stores, by the exclusive create each offers (what a lease is built on):

* local paths (and network file system mounts): the lease is written whole under a temporary name and
  hard-linked into place (``link`` fails when the name exists, as ``O_EXCL`` does, and no half-written body is
  ever seen). A heartbeat touches the holder's own file through its open descriptor, never another's; takeovers
  and releases hold ``flock`` on the file they replace and check that it is still the one at the path.
* ``s3://`` (S3, MinIO, moto; through s3fs): create is a PUT with ``If-None-Match: *``, heartbeat and takeover a
  PUT with ``If-Match: <ETag read>``, release a DELETE with ``If-Match``; ages by the store's clock (the
  response's Date less the object's Last-Modified).
* any other store: refused (a ConfigError on output.url).

A holder is dead when its process is gone on this machine (same boot and pid namespace; the pid's start time
is compared, so a reused pid is no holder), or when its heartbeat is older than ``output.lease_stale_s``.
"""
from __future__ import annotations

import _thread
import email.utils
import fcntl
import json
import logging
import os
import posixpath
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fsspec.asyn import sync

from .config import ConfigError
from .storage import is_local

__all__ = ["LEASE_NAME", "HEARTBEATS_PER_STALE", "Holder", "OutputLease", "LeaseLostError", "new_run_id"]

LEASE_NAME = "_lease.json"
HEARTBEATS_PER_STALE = 20     # a holder is dead after missing this many heartbeats in a row
MAX_WAIT_POLL_S = 5.0         # while waiting for a lease, how often it is looked at again
S3_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

log = logging.getLogger("e2style.lease")


class LeaseLostError(RuntimeError):
    """Another run took this run's lease over (this run's heartbeat had stopped): this run must stop writing."""


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _machine() -> str:
    """This boot of this machine and this pid namespace: pids compare only between processes that share it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _pid_start(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    machine: str = ""
    pid_start: int | None = None
    command: str = ""
    age_s: float = 0.0        # seconds since the last heartbeat, as the store measures it (not stored)

    def body(self) -> bytes:
        d = asdict(self)
        d.pop("age_s")
        return json.dumps(d, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, heartbeat_at: float, age_s: float) -> Holder:
        """A stored lease, with its heartbeat as the store dates it (a file's mtime, an object's Last-Modified)."""
        try:
            d = json.loads(data)
            return cls(**{k: d.get(k) for k in ("run_id", "host", "pid", "started_at", "machine", "pid_start",
                                                "command")}, heartbeat_at=heartbeat_at, age_s=age_s)
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError("output.url", f"its {LEASE_NAME} is not a lease this pipeline wrote ({e}); remove it "
                                            f"if no run writes there") from None

    def describe(self) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started {_iso(self.started_at)}, "
                f"last heartbeat {_iso(self.heartbeat_at)}, {self.age_s:.0f} s ago)")


class _LocalStore:
    """The lease as a file; a token is the (device, inode) of the file read."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None    # this run's lease file, open while held

    def _write_temp(self, holder: Holder) -> tuple[str, int]:
        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, holder.body())
        os.fsync(fd)
        return tmp, fd

    def read(self) -> tuple[Holder, tuple[int, int]] | None:
        try:
            with open(self.path, "rb") as f:
                st, data = os.fstat(f.fileno()), f.read()
        except FileNotFoundError:
            return None
        return Holder.parse(data, st.st_mtime, time.time() - st.st_mtime), (st.st_dev, st.st_ino)

    def create(self, holder: Holder) -> bool:
        tmp, fd = self._write_temp(holder)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            os.close(fd)
            return False
        finally:
            os.unlink(tmp)
        self.fd = fd
        return True

    def adopt(self, token: tuple[int, int]) -> bool:
        return False                           # a local create's answer is never lost: nothing to adopt

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def replace(self, holder: Holder, token: tuple[int, int]) -> bool:
        try:
            old = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(old, fcntl.LOCK_EX)    # takeovers and releases of this file one at a time
            st = os.fstat(old)
            if (st.st_dev, st.st_ino) != token or not self._is_current(old):
                return False
            tmp, fd = self._write_temp(holder)
            os.replace(tmp, self.path)
            self.fd = fd
            return True
        finally:
            os.close(old)

    def heartbeat(self, holder: Holder) -> bool:
        os.utime(self.fd)                      # this run's own file only, replaced or not
        return self._is_current(self.fd)

    def delete(self) -> bool:
        fd, self.fd = self.fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not self._is_current(fd):
                return False
            os.unlink(self.path)
            return True
        finally:
            os.close(fd)


def _s3_lost_race(e: BaseException) -> bool:
    cause = e.__cause__ or e
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in S3_LOST_RACE


class _S3Store:
    """The lease as an object; a token is the ETag read."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)
        self.etag: str | None = None          # this run's lease object, while held

    def read(self) -> tuple[Holder, str] | None:
        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp
            finally:
                resp["Body"].close()

        try:
            data, resp = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        date = (resp.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
        server_now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        modified = resp["LastModified"].timestamp()
        return Holder.parse(data, modified, server_now - modified), resp["ETag"]

    def _put(self, holder: Holder, **condition) -> bool:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=holder.body(),
                                  ContentType="application/json", **condition)
        except OSError as e:
            if _s3_lost_race(e):
                return False
            raise
        self.etag = out["ETag"]
        return True

    def create(self, holder: Holder) -> bool:
        return self._put(holder, IfNoneMatch="*")

    def adopt(self, token: str) -> bool:
        self.etag = token
        return True

    def replace(self, holder: Holder, token: str) -> bool:
        return self._put(holder, IfMatch=token)

    def heartbeat(self, holder: Holder) -> bool:
        return self._put(holder, IfMatch=self.etag)

    def delete(self) -> bool:
        etag, self.etag = self.etag, None
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except OSError as e:
            if _s3_lost_race(e):
                return False
            raise
        return True


def _store(fs, path: str, url: str):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if is_local(fs):
        return _LocalStore(path)
    if "s3" in protocols:
        return _S3Store(fs, path)
    raise ConfigError("output.url", f"{url}: a lease (one writer per output) needs an exclusive create, which this "
                                    f"pipeline has for local paths and s3:// only, not {'/'.join(protocols)}://; "
                                    f"write to one of those")


class OutputLease:
    """The lease of one output: ``peek`` (reads only), ``acquire`` (returns the live holder that refused it, or
    None once held, with a heartbeat thread), ``release``; ``lost`` once another run took it over."""

    def __init__(self, fs, root: str, url: str, *, stale_s: float, wait_s: float = 0.0, run_id: str | None = None):
        self.url = url
        self.store = _store(fs, posixpath.join(root, LEASE_NAME), url)
        self.stale_s, self.wait_s = float(stale_s), float(wait_s)
        self.heartbeat_s = self.stale_s / HEARTBEATS_PER_STALE
        self.run_id = run_id or new_run_id()
        self.started_at = time.time()
        self.held = self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_sigterm = None
        self._sigterm_installed = False

    def _me(self) -> Holder:
        return Holder(self.run_id, socket.gethostname(), os.getpid(), self.started_at, time.time(), _machine(),
                      _pid_start(os.getpid()), " ".join(sys.argv)[:500])

    def peek(self) -> Holder | None:
        got = self.store.read()
        return got[0] if got else None

    def dead_because(self, h: Holder) -> str | None:
        """Why the holder is dead, or None while it may be alive."""
        if h.machine and h.machine == _machine() and _pid_start(h.pid) != h.pid_start:
            return f"its process {h.pid} on this machine is gone"
        if h.age_s > self.stale_s:
            return f"its last heartbeat is {h.age_s:.0f} s old (output.lease_stale_s: {self.stale_s:.0f})"
        return None

    def _try(self) -> Holder | None:
        """One attempt: None when this run now holds the lease, else the live holder."""
        holder = None
        for _ in range(8):                    # each turn follows a change another run made meanwhile
            if self.store.create(self._me()):
                return None
            got = self.store.read()
            if got is None:
                continue                      # released since: create again
            holder, token = got
            if holder.run_id == self.run_id and self.store.adopt(token):
                return None                   # this run's own create, whose answer was lost and retried
            why = self.dead_because(holder)
            if why is None:
                return holder
            if self.store.replace(self._me(), token):
                log.warning("took over the stale lease on %s of %s: %s", self.url, holder.describe(), why)
                return None
            log.info("another run took over the stale lease on %s first", self.url)
        return holder

    def acquire(self) -> Holder | None:
        """Take the lease, waiting up to wait_s for a live holder to end; the holder still there when refused."""
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try()
            if holder is None:
                self._hold()
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return holder
            log.info("output %s is leased by %s; waiting up to %.0f s more", self.url, holder.describe(), left)
            time.sleep(min(left, MAX_WAIT_POLL_S, self.heartbeat_s))

    def refusal(self, holder: Holder) -> str:
        waited = f" after waiting {self.wait_s:.0f} s" if self.wait_s else ""
        return (f"output {self.url} is being written by {holder.describe()}; this run was refused{waited}, before "
                f"writing anything. Let that run finish (set output.lease_wait_s to wait for it), or stop it; "
                f"a dead run's lease is taken over by the next run: at once on its own machine, elsewhere once "
                f"its heartbeat is older than output.lease_stale_s ({self.stale_s:.0f} s)")

    def _hold(self) -> None:
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="output-lease-heartbeat", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            # `ray job stop` and schedulers send SIGTERM first: unwind, so that the lease is released.
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True

    def _on_sigterm(self, signum, frame):
        if self.lost:
            raise LeaseLostError(f"the lease on {self.url} was taken over by another run; this run stopped")
        raise SystemExit(128 + signum)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ours = self.store.heartbeat(self._me())
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("lease heartbeat on %s failed (%s); trying again in %.0f s", self.url, e, self.heartbeat_s)
                continue
            if not ours:
                self.lost = True
                log.error("the lease on %s was taken over by another run (this run's heartbeat had stopped for "
                          "over %.0f s): stopping this run", self.url, self.stale_s)
                if self._sigterm_installed:
                    _thread.interrupt_main(signal.SIGTERM)
                return

    def release(self) -> None:
        """Give the lease back (a lease another run took over is left to it)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old_sigterm is None else self._old_sigterm)
            self._sigterm_installed = False
        if self.lost:
            return
        try:
            if not self.store.delete():
                log.warning("the lease on %s was no longer this run's at its end", self.url)
        except OSError as e:
            log.warning("could not release the lease on %s (%s): the next run takes it over once it is stale",
                        self.url, e)
