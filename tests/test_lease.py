"""The output lease on local disk and on a real S3 server: one holder at a time, stale leases taken over."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from pipeline.lease import LEASE_FILE, OutputError, OutputLease
from pipeline.storage import Retry


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[fsspec.AbstractFileSystem, str]:
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "out")
    bucket, options = request.getfixturevalue("s3_bucket")
    return fsspec.filesystem("s3", **options), f"{bucket.removeprefix('s3://')}/out"


def lease_of(fs, root) -> dict:
    return json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))


def test_a_second_run_is_refused_while_the_first_holds_the_lease(output):
    fs, root = output
    with OutputLease(fs, root, "the-output", retry=Retry(1)) as first:
        held = lease_of(fs, root)
        assert held["run"] == first.holder["run"] and held["expires_at"] > time.time()
        with pytest.raises(OutputError, match=r"the-output: in use by another run \(host .*, pid \d+, started 20"):
            OutputLease(fs, root, "the-output", retry=Retry(1)).__enter__()
        assert lease_of(fs, root) == held  # the refused run changed nothing
    assert not fs.exists(f"{root}/{LEASE_FILE}")  # released
    with OutputLease(fs, root, "the-output", retry=Retry(1)):  # and free again
        pass


def test_the_lease_is_renewed_while_held(output):
    fs, root = output
    with OutputLease(fs, root, "out", retry=Retry(1), ttl_s=0.8):
        first = lease_of(fs, root)["expires_at"]
        time.sleep(0.6)
        assert lease_of(fs, root)["expires_at"] > first


def test_stale_leases_are_taken_over(output):
    fs, root = output
    fs.makedirs(root, exist_ok=True)
    expired = {"host": "elsewhere", "pid": 1, "run": "old", "started_at": "2026-01-01", "expires_at": time.time() - 1}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(expired).encode())
    with OutputLease(fs, root, "out", retry=Retry(1)) as lease:
        assert lease_of(fs, root)["run"] == lease.holder["run"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    on_this_host = {**expired, "host": socket.gethostname(), "pid": int(dead.stdout), "expires_at": time.time() + 600}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(on_this_host).encode())
    with OutputLease(fs, root, "out", retry=Retry(1)) as lease:  # its process is gone: no need to wait for it to expire
        assert lease_of(fs, root)["run"] == lease.holder["run"]

    ended_here = {**on_this_host, "pid": os.getpid(), "run": "failed-before"}  # a run of this process, over
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(ended_here).encode())
    with OutputLease(fs, root, "out", retry=Retry(1)) as lease:
        assert lease_of(fs, root)["run"] == lease.holder["run"]

    elsewhere = {**on_this_host, "host": "another-host"}  # a live lease of another host is respected
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(elsewhere).encode())
    with pytest.raises(OutputError, match="host another-host"):
        OutputLease(fs, root, "out", retry=Retry(1)).__enter__()



def test_a_reader_never_sees_a_lease_half_written(tmp_path):
    """Another run reads the lease while its holder renews it: a half-written lease would read as expired.

    Local disk only: a PUT to S3 is whole by itself.
    """
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    with OutputLease(fs, root, "out", retry=Retry(1), ttl_s=0.004) as lease:  # renewed every millisecond
        reads = [lease_of(fs, root) for _ in range(2000)]
    assert all(read["run"] == lease.holder["run"] for read in reads)
    assert len({read["expires_at"] for read in reads}) > 20  # the reads did cross renewals
    assert os.listdir(root) == []  # released, and no staged file left behind


def test_a_local_filesystem_without_hard_links_still_takes_the_lease(tmp_path, monkeypatch):
    """Where link(2) is refused (EPERM: e.g. a FUSE mount of a bucket) the lease is created by name instead."""
    def refused(source, destination):
        raise OSError(errno.EPERM, "Operation not permitted", source)

    monkeypatch.setattr(os, "link", refused)
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    with OutputLease(fs, root, "out", retry=Retry(1)) as lease:
        assert lease_of(fs, root)["run"] == lease.holder["run"]
        with pytest.raises(OutputError, match="in use by another run"):
            OutputLease(fs, root, "out", retry=Retry(1)).__enter__()
    assert os.listdir(root) == []  # released, and no staged file left behind
