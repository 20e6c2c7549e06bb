"""Shared fixtures: a real S3 server on loopback (moto) and one local Ray per test session."""

from __future__ import annotations

import os
import uuid

import pytest

# moto's credentials, set before anything starts: Ray's workers (which read and count S3 inputs) inherit them too
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields the fsspec `storage_options` that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint},
    }
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> tuple[str, dict]:
    """A fresh, empty bucket; yields (`s3://bucket`, storage_options)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}", s3_server


@pytest.fixture(scope="session")
def ray_session():
    """Local Ray, started once for the whole test session."""
    import ray

    # Ray Train's controller looks at its workers every 2 s by default: each run would end up to 2 s late.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # address="local": a Ray of its own, never a cluster that something else started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
