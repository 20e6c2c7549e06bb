"""Exit codes as the README states them, each the exit status of a real `seggpt-autolabel` process: 0 when the run
finished (also when an input went away mid-run), 2 when it was refused before any work and only then, 3 when storage
stayed away past `storage.retry_s`, whether a read task or the writer met the outage first.

Small runs: four of the demo's images, its checkpoint and prompt set, `storage.retry_s: 1`; the S3 server is moto's on
loopback, stopped mid-run (`tests.test_faults.FlakyS3`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from tests.test_faults import FlakyS3

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo"
CLI = Path(sys.executable).with_name("seggpt-autolabel")  # the console script of the venv running the tests
IMAGES = sorted((DEMO / "images").iterdir())[:4]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}  # a Ray of its own
TIMEOUT_S = 240


@pytest.fixture
def flaky_s3():
    server = FlakyS3()
    yield server
    server.server.stop()


def job_file(
    tmp_path: Path,
    images: str,
    output: str,
    storage_options: dict | None = None,
    *,
    checkpoint: Path = DEMO / "checkpoint",
) -> Path:
    config = {
        "input": {"uri": images},
        "prompts": {"uri": str(DEMO / "prompts"), "classes": json.loads((DEMO / "classes.json").read_text())},
        "model": {"checkpoint": str(checkpoint)},
        "output": {"uri": output},
        "compute": {"batch_size": 4, "actors": [1, 1]},
        "storage": {"retry_s": 1},
        "storage_options": storage_options or {},
    }
    path = tmp_path / f"job-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def local_images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for image in IMAGES:
        shutil.copy(image, folder)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)


def said(stderr: str) -> list[str]:
    """The lines the CLI itself wrote (Ray logs to the same stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("seggpt-autolabel")]


# --- 2: refused before any work, and only then ----------------------------------------------------------------------


def test_a_checkpoint_missing_a_shard_is_refused_naming_it(tmp_path):
    checkpoint = tmp_path / "sharded"
    checkpoint.mkdir()
    shutil.copy(DEMO / "checkpoint" / "config.json", checkpoint)
    index = {
        "weight_map": {
            "pos_embed": "model-00001-of-00002.safetensors",
            "mask_token": "model-00002-of-00002.safetensors",
        }
    }
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(DEMO / "checkpoint" / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    result = cli(
        "run", str(job_file(tmp_path, str(local_images(tmp_path)), str(tmp_path / "out"), checkpoint=checkpoint))
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"seggpt-autolabel: error: {checkpoint}: model.safetensors.index.json "
        f"names shards that are not there: model-00002-of-00002.safetensors"
    ]
    assert not (tmp_path / "out").exists()  # nothing touched


def test_an_output_in_a_bucket_that_does_not_exist_is_refused_naming_it(tmp_path, s3_server):
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/out"
    result = cli("run", str(job_file(tmp_path, str(local_images(tmp_path)), missing, s3_server)))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"seggpt-autolabel: error: output.uri {missing}: "), line
    assert not fsspec.filesystem("s3", **s3_server).exists(missing.removeprefix("s3://").split("/")[0])


# --- 0, and a file that goes away mid-run ---------------------------------------------------------------------------


def test_an_input_gone_mid_run_is_an_error_row_and_the_run_exits_0(tmp_path):
    """Listed, then deleted before it is read (FileNotFoundError, once a refusal): the run goes on and exits 0."""
    images = local_images(tmp_path)
    gone = images / IMAGES[1].name
    child = subprocess.Popen(
        [str(CLI), "run", str(job_file(tmp_path, str(images), str(tmp_path / "out")))],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in child.stdout:  # listed, not read yet: Ray starts after this line
        if line.startswith("planned:"):
            gone.unlink()
            break
    out, err = child.communicate(timeout=TIMEOUT_S)
    assert child.returncode == 0, err
    assert said(err) == []
    rows = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "labels").to_pylist()}
    assert sorted(rows) == [image.name for image in IMAGES]
    assert rows[gone.name]["status"] == "error" and "FileNotFoundError" in rows[gone.name]["error"]
    assert all(row["status"] == "ok" for key, row in rows.items() if key != gone.name)


# --- 3: storage away past storage.retry_s ---------------------------------------------------------------------------


class StopAfterTheDriversLastCall(logging.Handler):
    """Stops `server` once the driver of a run on it has made its last storage call before the labelling starts:
    the check for a stale `_SUCCESS` right after it writes `_job.json` (the server logs each request it serves to the
    `werkzeug` logger). From then on the store is reached only by the job's read tasks and its writer."""

    def __init__(self, server: FlakyS3, bucket: str) -> None:
        super().__init__()
        self.server = server
        self.job_file, self.success_file = f"PUT /{bucket}/out/_job.json ", f"/{bucket}/out/_SUCCESS"
        self.wrote_job_file, self.seen = False, threading.Event()
        self.stopper = threading.Thread(target=self._stop, daemon=True)
        self.stopper.start()

    def emit(self, record: logging.LogRecord) -> None:
        request = record.getMessage()
        self.wrote_job_file = self.wrote_job_file or self.job_file in request
        if self.wrote_job_file and self.success_file in request:
            self.seen.set()

    def _stop(self) -> None:
        self.seen.wait()
        time.sleep(0.2)  # the check's second request (a listing) comes within milliseconds; a read task in seconds
        self.server.stop()


def run_through_an_outage(tmp_path: Path, server: FlakyS3, images: str, bucket: str) -> subprocess.CompletedProcess:
    """A run whose output is in `bucket` on `server`, which goes away for good once the driver has started the
    labelling."""
    # one request per try: botocore's own retries (5 tries with back-off) would only stretch each of the job's tries
    options = {**server.options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    path = job_file(tmp_path, images, f"s3://{bucket}/out", options)
    watcher, log = StopAfterTheDriversLastCall(server, bucket), logging.getLogger("werkzeug")
    log.addHandler(watcher)
    try:
        result = cli("run", str(path))
    finally:
        log.removeHandler(watcher)
    assert watcher.seen.is_set() and not watcher.stopper.is_alive()
    return result


def test_an_outage_a_read_task_meets_first_exits_3(tmp_path, flaky_s3):
    """The images are on the store too: the read tasks are the first to meet the outage and make error rows of their
    images; then the writer cannot write their labels file (error rows have no mask to write first) and gives up."""
    bucket = f"reads-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", **flaky_s3.options)
    fs.mkdir(bucket)
    for image in IMAGES:
        fs.pipe_file(f"{bucket}/images/{image.name}", image.read_bytes())
    result = run_through_an_outage(tmp_path, flaky_s3, f"s3://{bucket}/images", bucket)
    assert result.returncode == 3, result.stderr
    (line,) = said(result.stderr)
    assert line.startswith(
        f"seggpt-autolabel: error: storage unreachable for 1 s (storage.retry_s) at s3://{bucket}/out/labels/part-"
    ), line
    assert result.stderr.splitlines()[-1] == line  # the CLI's line, no traceback of its own after it


def test_an_outage_the_writer_meets_first_exits_3(tmp_path, flaky_s3):
    """The images are local: the writer is the first to meet the outage, with the masks of ok rows."""
    bucket = f"writes-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", **flaky_s3.options).mkdir(bucket)
    result = run_through_an_outage(tmp_path, flaky_s3, str(local_images(tmp_path)), bucket)
    assert result.returncode == 3, result.stderr
    (line,) = said(result.stderr)
    assert line.startswith(
        f"seggpt-autolabel: error: storage unreachable for 1 s (storage.retry_s) at s3://{bucket}/out/masks: "
    ), line
    assert result.stderr.splitlines()[-1] == line
