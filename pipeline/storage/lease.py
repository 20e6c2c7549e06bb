"""A lease on an output: one run at a time writes to it.

`_lease.json` under the output names its holder (host, pid, run id) and when it expires. Every change to it is one
conditional step on the version last read: on S3 a PUT with `If-None-Match: *` (create) or `If-Match: <ETag>`
(renew, take over) and a DELETE with `If-Match` (give back); locally a compare and `os.replace` under an exclusive
`flock` of `_lease.lock` (released by the kernel if its holder dies), so a reader sees a lease whole. Of two runs
that create, renew or take over the same version, exactly one succeeds. Other stores are refused (`OutputError`).

A lease is stale, and taken over, once it has expired (its holder stopped renewing: killed, or cut off from the
store), when its holder ran on this host and its process is gone (a killed driver restarted on the same machine need
not wait), or when it is this process's and the run is over (a notebook's next run need not wait).

What is exact: **a run writes only while its lease is live.** Its writes (`OutputLease.retry`, a `HeldRetry`: the
driver's and the writer actors') read the lease before every attempt and start one only while the lease is the
run's with at least `ttl / 2` left; otherwise they wait within `storage.retry_s` (`LeaseLapsing`) or, once another
run took the lease over, stop with `LeaseLost` (exit 3). So a second run can take over only a lease whose holder
writes no more, however long its retries go on: read tasks and writers retry each operation for up to
`storage.retry_s`, and one after another (a read that gave up, then the write of its error rows) they can ride out
longer outages than that, so no fixed expiry could be exact. The assumptions: one write attempt lasts under
`ttl / 2`, and hosts' clocks agree to within seconds. The renewer thread renews every `ttl / 4` (every 2 s after a
failed try), also after an expiry: the conditional replace lets it win back a lease no one took over yet.

The expiry defaults to twice `storage.retry_s` (at least 30 s), so that an outage the job's retries ride out keeps
the lease: a run started during it is refused. A run that ends (done, refused, or failed) gives the lease back at
once, retried for at most 5 s (its storage may be gone: then the lease expires).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.output import OutputError
from pipeline.storage.retry import Retry, StorageUnavailable

T = TypeVar("T")

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"  # local filesystems only: held for the moment of a conditional replace
_MIN_TTL_S = 30.0
_RELEASE_S = 5.0  # the most a release retries: the run is over, its storage may be gone
_RENEW_AFTER_FAILURE_S = 2.0  # a renewal that failed is tried again this soon (or at ttl / 4, if sooner)
_HELD: set[str] = set()  # run ids of the leases this process holds now


class LeaseLost(StorageUnavailable):
    """Another run took the output's lease over (this run's lease had expired, unrenewed): this run writes no more."""

    def __str__(self) -> str:
        return (
            f"lease lost at {self.uri}: {LEASE_FILE} expired unrenewed and {self.cause} took it over; this run "
            f"stopped writing (run it again once that run is done: it resumes)"
        )


class LeaseLapsing(TimeoutError):
    """The run's lease expires too soon to start a write (not renewed lately): retried until it is renewed."""


@dataclass(frozen=True)
class HeldRetry(Retry):
    """`Retry` for the writes of the run holding a lease: every attempt first reads the lease and starts only while
    it is this run's with at least `margin_s` left (picklable: the writer actors get it)."""

    fs: Any = None
    path: str = ""
    run: str = ""
    margin_s: float = 0.0

    def __call__(self, action: Callable[[], T], uri: str) -> T:
        return super().__call__(lambda: self._while_held(action, uri), uri)

    def _while_held(self, action: Callable[[], T], uri: str) -> T:
        lease = read_lease(self.fs, self.path)[0]
        if lease is None or lease.get("run") != self.run:
            holder = f"run {lease.get('run')} (host {lease.get('host')}, pid {lease.get('pid')})" if lease else "no run"
            raise LeaseLost(uri, self.budget_s, holder)
        left = float(lease.get("expires_at", 0)) - time.time()
        if left < self.margin_s:
            raise LeaseLapsing(f"the lease {LEASE_FILE} expires in {left:.0f} s, unrenewed: no write starts now")
        return action()


class OutputLease:
    """Context manager holding the lease of `root` on `fs` for the duration of a run; its `retry` is the one for
    the run's writes."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, uri: str, *, retry: Retry, ttl_s: float | None = None):
        if not isinstance(fs, LocalFileSystem) and "s3" not in fs.protocol:
            raise OutputError(
                f"output.uri {uri}: the output's lease needs S3 (or a store speaking S3 with conditional "
                f"writes) or a filesystem path"
            )
        self.fs, self.root, self.path, self.uri = fs, root, f"{root}/{LEASE_FILE}", uri
        self.ttl_s = max(2 * retry.budget_s, _MIN_TTL_S) if ttl_s is None else ttl_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run": uuid.uuid4().hex,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._take_retry = retry
        self.retry = HeldRetry(
            retry.budget_s,
            retry.first_delay_s,
            retry.max_delay_s,
            fs=fs,
            path=self.path,
            run=self.holder["run"],
            margin_s=self.ttl_s / 2,
        )
        self._version: Any = None  # of the lease as this run last wrote it (see `read_lease`)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="output-lease", daemon=True)

    def __enter__(self) -> OutputLease:
        self._take_retry(self._take, self.uri)
        _HELD.add(self.holder["run"])
        self._renewer.start()
        return self

    def _take(self) -> None:
        current, version = read_lease(self.fs, self.path)
        if current is not None and current.get("run") == self.holder["run"]:
            self._version = version  # an earlier try of ours wrote it, and its answer was lost
            return
        if current is not None and not _stale(current):
            raise OutputError(
                f"output.uri {self.uri}: in use by another run (host {current.get('host')}, pid "
                f"{current.get('pid')}, started {current.get('started_at')}); its lease {LEASE_FILE} "
                f"expires {_when(current.get('expires_at'))} unless renewed"
            )
        try:
            self._version = self._replace(version, self._content())  # absent or stale: create it or take it over
        except FileNotFoundError:  # S3: no such bucket (a folder is made where there is none)
            raise OutputError(f"output.uri {self.uri}: no such bucket") from None
        if self._version is None:
            raise OutputError(f"output.uri {self.uri}: another run took the lease {LEASE_FILE} just now")

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        _HELD.discard(self.holder["run"])
        try:  # the run is over, whatever its end: give the lease back at once, or leave it to expire
            Retry(min(self._take_retry.budget_s, _RELEASE_S))(self._give_back, self.uri)
        except Exception:
            if kind is None:
                raise
            # a failed run's own error is the one to report

    def _give_back(self) -> None:
        current, version = read_lease(self.fs, self.path)
        if current is not None and current.get("run") == self.holder["run"]:
            self._remove(version)

    def _content(self) -> bytes:
        return json.dumps({**self.holder, "expires_at": time.time() + self.ttl_s}).encode()

    def _replace(self, version: Any, content: bytes) -> Any:
        """Write `content` as the lease only where the lease is still `version` (None: absent), in one step: its new
        version, or None where another run changed it first. S3: a PUT with `If-Match: <ETag>` (`If-None-Match: *`
        to create); locally: compared and renamed into place under `LOCK_FILE`."""
        if isinstance(self.fs, LocalFileSystem):
            with self._locked():
                if read_lease(self.fs, self.path)[1] != version:
                    return None
                staged = f"{self.path}.{uuid.uuid4().hex}"
                with open(staged, "wb") as file:
                    file.write(content)
                os.replace(staged, self.path)  # a reader sees the old lease or the new one, whole
                return content
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.fs.pipe_file(self.path, content, **condition)["ETag"]
        except (FileExistsError, OSError) as error:
            if isinstance(error, FileExistsError) or _refused_condition(error):
                return None
            raise

    def _remove(self, version: Any) -> None:
        """Delete the lease where it is still `version` (S3: a DELETE with `If-Match`)."""
        if isinstance(self.fs, LocalFileSystem):
            with self._locked():
                if read_lease(self.fs, self.path)[1] == version:
                    os.unlink(self.path)
            return
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except OSError as error:
            if not _refused_condition(error):
                raise
        self.fs.invalidate_cache(self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        with open(f"{self.root}/{LOCK_FILE}", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by close, or by the kernel if this process dies
            yield

    def _renew(self) -> None:
        wait = self.ttl_s / 4
        while not self._stop.wait(wait):
            try:
                version = self._replace(self._version, self._content())
                if version is None:  # changed since our last write: still ours where a renewal's answer was lost
                    current, version = read_lease(self.fs, self.path)
                    if current is None or current.get("run") != self.holder["run"]:
                        return  # taken over after it expired: the run's writes stop (`HeldRetry`)
            except Exception:  # noqa: BLE001 - e.g. the store unreachable for now: try again soon
                wait = min(self.ttl_s / 4, _RENEW_AFTER_FAILURE_S)
                continue
            self._version, wait = version, self.ttl_s / 4


def read_lease(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any] | None, Any]:
    """The lease at `path` and its version (S3: its ETag, read with it in one GET; locally: its bytes), or
    (None, None) where there is none; ({}, version) for a file that is not a lease (taken as expired)."""
    try:
        if isinstance(fs, LocalFileSystem):
            with open(path, "rb") as file:
                data = version = file.read()
        else:
            data, version = _get_with_etag(fs, path)
    except FileNotFoundError:
        return None, None
    try:
        return json.loads(data), version
    except ValueError:
        return {}, version


def _get_with_etag(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), response["ETag"]

    return sync(fs.loop, get)


def _refused_condition(error: BaseException) -> bool:
    """Whether S3 refused a conditional request: the object is not (or no longer) the version named."""
    text = f"{error} {error.__cause__}"
    return "PreconditionFailed" in text or "ConditionalRequestConflict" in text


def _stale(lease: dict[str, Any]) -> bool:
    if float(lease.get("expires_at", 0)) < time.time():
        return True
    if lease.get("host") == socket.gethostname() and lease.get("pid") == os.getpid():
        return lease.get("run") not in _HELD  # a run of this process that ended without giving it back
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


def _when(epoch: Any) -> str:
    try:
        return datetime.fromtimestamp(float(epoch), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError):
        return "at an unknown time"
