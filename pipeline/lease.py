"""A lease on an output: one run at a time writes to it.

`_lease.json` under the output names its holder (host, pid, run id) and when it expires. It is created with a
create-if-absent write (locally a hard link of a file written whole; on S3 a PUT with `If-None-Match: *`), so of two
runs that start at once exactly one gets it. The holder renews it every `ttl_s / 4` seconds from a thread (locally
by an atomic rename) and deletes it at the end, so a reader never sees a lease half written (except on a local
filesystem without hard links, where it is created by name and then written). A lease is stale, and taken over, once
it has expired (its holder stopped renewing: killed, or cut off from the store) or when its holder ran on this host
and its process is gone (a killed driver restarted on the same machine need not wait), or is this process and the
run is over (a run that failed could not give it back: the next one from the same notebook need not wait). Taking
and giving back the lease go through the job's storage `Retry` (after a failed run: one try); a renewal that fails
waits for the next tick.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import Retry

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 120.0
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # what link(2) says there
_HELD: set[str] = set()  # run ids of the leases this process holds now


class OutputError(ValueError):
    """The output cannot take this run: another run holds it, or it holds labels this run would mix with."""


class OutputLease:
    """Context manager holding the lease of `root` on `fs` for the duration of a run."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, uri: str, *, retry: Retry, ttl_s: float = DEFAULT_TTL_S
    ):
        self.fs, self.path, self.uri, self.retry, self.ttl_s = fs, f"{root}/{LEASE_FILE}", uri, retry, ttl_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                       "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="output-lease", daemon=True)

    def __enter__(self) -> OutputLease:
        self.retry(self._take, self.uri)
        _HELD.add(self.holder["run"])
        self._renewer.start()
        return self

    def _take(self) -> None:
        if not self._create():
            current = self._read()
            if current is not None and current.get("run") == self.holder["run"]:
                return  # an earlier try of ours wrote it, and its answer was lost
            if current is not None and not _stale(current):
                raise OutputError(
                    f"output.uri {self.uri}: in use by another run (host {current.get('host')}, pid "
                    f"{current.get('pid')}, started {current.get('started_at')}); its lease {LEASE_FILE} "
                    f"expires {_when(current.get('expires_at'))} unless renewed"
                )
            self.fs.rm_file(self.path)  # stale: take it over
            if not self._create():
                raise OutputError(f"output.uri {self.uri}: another run took the lease {LEASE_FILE} just now")

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        _HELD.discard(self.holder["run"])
        if kind is None:
            self.retry(self._give_back, self.uri)
            return
        try:  # the run failed (its storage may be gone): one try, then the lease expires or is taken over by itself
            self._give_back()
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            pass

    def _give_back(self) -> None:
        current = self._read()
        if current is not None and current.get("run") == self.holder["run"]:
            self.fs.rm_file(self.path)

    def _content(self) -> bytes:
        return json.dumps({**self.holder, "expires_at": time.time() + self.ttl_s}).encode()

    def _create(self) -> bool:
        """Write the lease only where none exists; whether it was written."""
        self.fs.makedirs(self.path.rpartition("/")[0], exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            try:
                self._write_local(os.link)
                return True
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno not in _NO_HARD_LINKS:
                    raise
            try:  # a filesystem without hard links (some FUSE mounts): create the name, then write into it
                with open(self.path, "xb") as file:
                    file.write(self._content())
                return True
            except FileExistsError:
                return False
        try:
            self.fs.pipe_file(self.path, self._content(), mode="create")
            return True
        except (FileExistsError, OSError) as error:
            if "PreconditionFailed" in str(error) or isinstance(error, FileExistsError):
                return False
            raise

    def _write_local(self, publish: Callable[[str, str], None]) -> None:
        """Write the lease whole to a file of this run, then `publish` it under the lease's name in one step.

        A reader never sees a lease half written: `os.link` creates the name only where none exists,
        `os.replace` swaps the file. (A PUT to an object store is whole already.)
        """
        staged = f"{self.path}.{self.holder['run']}"
        with open(staged, "wb") as file:
            file.write(self._content())
        try:
            publish(staged, self.path)
        finally:
            if os.path.exists(staged):
                os.unlink(staged)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # half written (only without hard links) or not a lease at all: treat as expired
            return {}

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is None or current.get("run") == self.holder["run"]:
                    if isinstance(self.fs, LocalFileSystem):
                        self._write_local(os.replace)
                    else:
                        self.fs.pipe_file(self.path, self._content())
            except Exception:  # noqa: BLE001 - e.g. the store unreachable for now: the next tick tries again
                pass


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
