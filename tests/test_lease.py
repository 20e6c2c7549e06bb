"""The output lease on local disk and on a real S3 server: one holder at a time, stale leases taken over."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.lease import LEASE_FILE, LOCK_FILE, OutputLease
from pipeline.storage.output import OutputError
from pipeline.storage.retry import Retry


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


def test_the_lease_outlasts_the_retry_budget_of_its_holder(output):
    """A holder cut off from storage keeps retrying for `storage.retry_s` (300 s by default): its lease, written at
    the last renewal before the cut, must still hold when the holder gives up, or a second run takes the output while
    the first may still write (the lease used to last 120 s, whatever the budget)."""
    fs, root = output
    for budget_s in (300.0, 1200.0):
        with OutputLease(fs, root, "out", retry=Retry(budget_s)) as lease:
            left = lease_of(fs, root)["expires_at"] - time.time()
            assert left > budget_s + lease.ttl_s / 4 + 5  # past the budget, counted from a renewal just missed


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
    assert len({read["expires_at"] for read in reads}) > 5  # the reads did cross renewals
    assert os.listdir(root) == [LOCK_FILE]  # released, and no staged file left behind


class Outage:
    """A TCP proxy in front of the S3 server: the holder's only way to storage, cut and restored at will."""

    def __init__(self, target: tuple[str, int]):
        import socketserver
        import threading

        outage = self

        class Forward(socketserver.BaseRequestHandler):
            def handle(self):
                if outage.cut.is_set():
                    return  # connection closed at once: the store is unreachable
                upstream = socket.create_connection(target)
                pumps = [
                    threading.Thread(target=_pump, args=pair, daemon=True)
                    for pair in ((self.request, upstream), (upstream, self.request))
                ]
                for pump in pumps:
                    pump.start()
                for pump in pumps:
                    pump.join()

        self.cut = threading.Event()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def outage(s3_bucket):
    """(bucket path, the holder's storage options through an `Outage`, everyone else's options, the Outage)."""
    bucket, options = s3_bucket
    endpoint = options["client_kwargs"]["endpoint_url"]
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = Outage((host, int(port)))
    holder = {
        **options,
        "client_kwargs": {"endpoint_url": proxy.endpoint},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 1},
        "skip_instance_cache": True,
    }
    yield bucket.removeprefix("s3://"), holder, options, proxy
    proxy.close()


def test_after_an_outage_longer_than_the_lease_the_holder_writes_nothing(outage):
    """The holder is cut off for longer than its lease lasts; a second run takes the output meanwhile. When storage
    comes back, the first run's writes (through its lease's retry) stop with `LeaseLost`: one writer at a time."""
    from pipeline.storage.lease import LeaseLost

    bucket, holder_options, options, proxy = outage
    root = f"{bucket}/out"
    holder_fs, fs = fsspec.filesystem("s3", **holder_options), fsspec.filesystem("s3", **options)
    with OutputLease(holder_fs, root, "out", retry=Retry(4.0), ttl_s=1.0) as first:
        proxy.cut.set()
        time.sleep(1.5)  # the lease has expired and cannot be renewed
        with OutputLease(fs, root, "out", retry=Retry(1.0)) as second:
            proxy.cut.clear()  # storage is back for the first run
            with pytest.raises(LeaseLost, match=r"lease lost at out: _lease.json expired unrenewed and run \w+ \(host"):
                first.retry(lambda: holder_fs.pipe_file(f"{root}/labels/late.parquet", b"late"), "out")
            assert not fs.exists(f"{root}/labels/late.parquet")
            time.sleep(0.6)  # the first run's renewer ticks: it must not take the lease back
            assert lease_of(fs, root)["run"] == second.holder["run"]
    assert not fs.exists(f"{root}/{LEASE_FILE}")  # the second run released it; the first did not delete it


def test_a_second_run_during_an_outage_the_job_rides_out_is_refused(outage):
    """With the lease's default expiry (twice `storage.retry_s`), an outage of nearly the retry budget keeps the
    lease: a run started during it is refused, and the holder writes once storage is back."""
    bucket, holder_options, options, proxy = outage
    root = f"{bucket}/out"
    holder_fs, fs = fsspec.filesystem("s3", **holder_options), fsspec.filesystem("s3", **options)
    with OutputLease(holder_fs, root, "out", retry=Retry(2.0)) as first:
        proxy.cut.set()
        time.sleep(1.6)  # 4/5 of the retry budget, over 120/300 of it (what the lease lasted before)
        with pytest.raises(OutputError, match="in use by another run"):
            OutputLease(fs, root, "out", retry=Retry(1.0)).__enter__()
        proxy.cut.clear()
        first.retry(lambda: holder_fs.pipe_file(f"{root}/labels/done.parquet", b"done"), "out")
    assert fs.cat_file(f"{root}/labels/done.parquet") == b"done"
    assert not fs.exists(f"{root}/{LEASE_FILE}")


def test_a_run_that_ends_in_a_refusal_or_a_storage_failure_releases_its_lease(outage):
    """What `autolabel` raises for exit 2 (a refusal inside the lease) and exit 3 (storage gone past the budget, back
    by the time the run ends) leaves no lease: the rerun starts at once, from any host. A release that cannot reach
    storage gives up within seconds."""
    from pipeline.storage.retry import StorageUnavailable

    bucket, holder_options, options, proxy = outage
    root = f"{bucket}/out"
    holder_fs, fs = fsspec.filesystem("s3", **holder_options), fsspec.filesystem("s3", **options)
    with pytest.raises(OutputError, match="labels made by another model"):
        with OutputLease(holder_fs, root, "out", retry=Retry(2.0)):
            raise OutputError("out: labels made by another model")
    assert not fs.exists(f"{root}/{LEASE_FILE}")

    with pytest.raises(StorageUnavailable):
        with OutputLease(holder_fs, root, "out", retry=Retry(1.0)) as lease:
            proxy.cut.set()
            try:
                lease.retry(lambda: holder_fs.pipe_file(f"{root}/labels/x.parquet", b"x"), "out")
            finally:
                proxy.cut.clear()
    assert not fs.exists(f"{root}/{LEASE_FILE}")

    with pytest.raises(StorageUnavailable):
        with OutputLease(holder_fs, root, "out", retry=Retry(60.0)):
            proxy.cut.set()
            ended = time.monotonic()
            raise StorageUnavailable("out", 60.0, "cut off")
    assert time.monotonic() - ended < 20.0  # the release was tried and given up in seconds, not storage.retry_s
    proxy.cut.clear()
    assert lease_of(fs, root)["expires_at"] > time.time()  # left to expire (or to its renewal-free takeover)


def stale_lease(run: str) -> bytes:
    return json.dumps(
        {"host": "elsewhere", "pid": 1, "run": run, "started_at": "2026-01-01", "expires_at": time.time() - 1}
    ).encode()


def contend(protocol: str, options: dict, root: str, rounds: int, stagger_s: float, barrier, results) -> None:
    """One of two processes that try, each round at once, to take over the stale lease the test wrote. Each starts
    up to `stagger_s` late (a few storage calls' time), so that the rounds cover the ways two takeovers interleave."""
    fs = fsspec.filesystem(protocol, **options)
    for _ in range(rounds):
        barrier.wait()
        time.sleep(random.uniform(0, stagger_s))
        lease = OutputLease(fs, root, "out", retry=Retry(1))
        try:
            lease.__enter__()
            results.put(("won", lease.holder["run"]))
        except OutputError:
            lease = None
            results.put(("refused", None))
        except Exception as error:  # noqa: BLE001 - the test says what went wrong
            lease = None
            results.put(("failed", repr(error)))
        barrier.wait()  # the test has read the lease
        if lease is not None:
            lease.__exit__(None, None, None)
        barrier.wait()  # given back: the next round


def test_two_processes_racing_for_a_stale_lease_exactly_one_wins(output):
    fs, root = output
    fs.makedirs(root, exist_ok=True)
    rounds, spawn = 30, multiprocessing.get_context("spawn")
    stagger_s = 0.0005 if isinstance(fs, LocalFileSystem) else 0.03
    barrier, results = spawn.Barrier(3, timeout=60), spawn.Queue()
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    arguments = (protocol, fs.storage_options, root, rounds, stagger_s, barrier, results)
    contenders = [spawn.Process(target=contend, args=arguments) for _ in range(2)]
    for process in contenders:
        process.start()
    outcomes, holders = [], []
    try:
        for number in range(rounds):
            fs.pipe_file(f"{root}/{LEASE_FILE}", stale_lease(f"old-{number}"))
            barrier.wait()
            outcomes.append(sorted(results.get(timeout=60) for _ in contenders))
            holders.append(lease_of(fs, root)["run"])
            barrier.wait()
            barrier.wait()
    finally:
        for process in contenders:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    both = sum(kinds == ["won", "won"] for kinds in ([kind for kind, _ in outcome] for outcome in outcomes))
    assert both == 0, f"both took the lease in {both} of {rounds} rounds"
    assert all([kind for kind, _ in outcome] == ["refused", "won"] for outcome in outcomes), outcomes
    assert holders == [outcome[1][1] for outcome in outcomes]  # the lease names the winner
    assert not fs.exists(f"{root}/{LEASE_FILE}")


def test_an_output_on_a_store_without_conditional_writes_is_refused():
    with pytest.raises(OutputError, match="memory://out: the output's lease needs S3"):
        OutputLease(fsspec.filesystem("memory"), "/out", "memory://out", retry=Retry(1))
