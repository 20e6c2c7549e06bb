"""Faults: storage that goes away mid-run (a real S3 server on loopback, stopped and started again on its port),
the retry policy's budget and exit code 3, and an inference actor killed mid-run."""

from __future__ import annotations

import errno
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import botocore.exceptions
import fsspec
import numpy as np
import pytest
import ray
import yaml
from moto.server import ThreadedMotoServer
from ray.core.generated import gcs_pb2

from jobs.cli import main as cli
from model.processing import decode_png
from pipeline.labelling.job import build_dataset, plan
from pipeline.prompts.sets import PromptSet
from pipeline.storage.retry import Retry, StorageUnavailable, is_transient, storage_failure
from tests.test_job import expected_map, long_job, read_labels

# --- the policy ------------------------------------------------------------------------------------------------


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def as_s3fs_raises(cause: Exception) -> OSError:
    """What s3fs makes of a ClientError it has no exception class for."""
    error = OSError(errno.EIO, str(cause))
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error, transient",
    [
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b"), True),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (TimeoutError("timed out"), True),
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (as_s3fs_raises(client_error("ServiceUnavailable", 503)), True),
        (FileNotFoundError(errno.ENOENT, "no such key"), False),
        (PermissionError(errno.EACCES, "access denied"), False),
        (client_error("AccessDenied", 403), False),
        (as_s3fs_raises(client_error("InvalidArgument", 400)), False),
        (OSError(errno.ENOSPC, "no space left on device"), False),
        (ValueError("not an image"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    assert is_transient(error) is transient


def failing(error: Exception, calls: list) -> callable:
    def action() -> None:
        calls.append(time.monotonic())
        raise error

    return action


def test_retry_until_success_permanent_errors_at_once_and_the_budget():
    calls: list = []

    def flaky() -> bytes:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return b"data"

    assert Retry(10, first_delay_s=0.01)(flaky, "s3://b/k") == b"data" and len(calls) == 4

    calls.clear()
    with pytest.raises(FileNotFoundError):
        Retry(10)(failing(FileNotFoundError("gone"), calls), "s3://b/k")
    assert len(calls) == 1

    calls.clear()
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as raised:
        Retry(0.5, first_delay_s=0.05, max_delay_s=0.1)(failing(refused, calls), "s3://bucket/out/labels/x.parquet")
    assert 0.3 < time.monotonic() - start < 1.5 and len(calls) > 3  # backed off, kept trying, stopped at the budget
    assert str(raised.value) == (
        "storage unreachable for 0.5 s (storage.retry_s) at s3://bucket/out/labels/x.parquet: "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = raised.value
    assert storage_failure(wrapped) is raised.value and storage_failure(RuntimeError("other")) is None
    from_ray = RuntimeError("RayTaskError(StorageUnavailable)")  # Ray keeps what the task raised as `cause`
    from_ray.cause = raised.value
    assert storage_failure(from_ray) is raised.value


# --- a server that goes away --------------------------------------------------------------------------------------


class FlakyS3:
    """A moto S3 server on loopback that can be stopped and started again on the same port, keeping its objects."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{self.host}:{self.port}"},
        }

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def flaky_s3():
    server = FlakyS3()
    yield server
    server.server.stop()


def s3_job(tmp_path: Path, server: FlakyS3, count: int, bucket: str) -> tuple[dict, fsspec.AbstractFileSystem]:
    """`long_job` with its images, checkpoint and prompts in `bucket` of `server`, and its output there too
    (moto keeps one store for every server of the process: each test has a bucket of its own)."""
    config = long_job(tmp_path, count)
    fs = fsspec.filesystem("s3", **server.options)
    fs.mkdir(bucket)
    for name, local in (
        ("data", config["input"]["uri"]),
        ("model", config["model"]["checkpoint"]),
        ("prompts", config["prompts"]["uri"]),
    ):
        fs.put(local, f"{bucket}/{name}", recursive=True)
    config["input"]["uri"] = f"s3://{bucket}/data"
    config["model"]["checkpoint"] = f"s3://{bucket}/model"
    config["prompts"]["uri"] = f"s3://{bucket}/prompts"
    config["output"]["uri"] = f"s3://{bucket}/out"
    config["storage_options"] = server.options
    return config, fs


def run(tmp_path: Path, config: dict, name: str, *overrides: str) -> int:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli(["run", str(path), *(f"--set={override}" for override in overrides)])


def outage_when(server: FlakyS3, fs, pattern: str, seconds: float | None) -> tuple[threading.Thread, dict]:
    """A thread that stops the server once a file matches `pattern`, and starts it again `seconds` later (never,
    for None). What it saw goes into the dict it returns."""
    seen: dict = {}

    def watch() -> None:
        while not (files := fs.glob(pattern)):
            time.sleep(0.05)
            fs.invalidate_cache()
        seen["files_at_stop"] = len(files)
        server.stop()
        seen["stopped_at"] = time.monotonic()
        if seconds is not None:
            time.sleep(seconds)
            server.start()
            seen["started_at"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def masks_by_key(output: str, options: dict) -> dict[str, bytes]:
    table = read_labels(output, options)
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key is in labels/ twice"
    assert set(table["status"].to_pylist()) == {"ok"}
    return dict(zip(keys, table["mask"].to_pylist()))


def check_labels(output: str, options: dict, assets: Path, images: dict[str, bytes]) -> None:
    """Every key of `images` once in `output`, ok, with the class map the model package gives (as a clean run)."""
    masks = masks_by_key(output, options)
    assert sorted(masks) == sorted(images)
    for key, data in images.items():
        assert np.array_equal(decode_png(masks[key]), expected_map(assets, data)), key


def images_of(folder: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


def test_a_30_second_outage_mid_run_is_ridden_out(tmp_path, flaky_s3, ray_session):
    config, fs = s3_job(tmp_path, flaky_s3, 30, "outage")
    config["output"]["file_mb"] = 0  # the files as written, counted below
    images = images_of(str(tmp_path / "data"))
    watcher, seen = outage_when(flaky_s3, fs, "outage/out/labels/*.parquet", seconds=30)
    started = time.monotonic()
    assert run(tmp_path, config, "outage") == 0
    ended = time.monotonic()
    watcher.join()

    fs.invalidate_cache()
    assert seen["files_at_stop"] < len(fs.glob("outage/out/labels/*.parquet"))  # the server went away mid-run ...
    assert ended > seen["started_at"] > seen["stopped_at"] + 29 > started  # ... and the run outlived the outage
    check_labels("s3://outage/out", flaky_s3.options, tmp_path, images)  # every key once, no error rows
    assert fs.exists("outage/out/_SUCCESS")


def test_past_the_retry_budget_the_job_exits_3_and_a_later_run_completes(tmp_path, flaky_s3, ray_session, capfd):
    """The server goes away as the run starts labelling (its `_job.json` is written) and stays away: reads become
    error rows, but the model's checkpoint and the writes cannot wait, whichever comes first stops the run."""
    config, fs = s3_job(tmp_path, flaky_s3, 10, "budget")
    watcher, seen = outage_when(flaky_s3, fs, "budget/out/_job.json", seconds=None)
    capfd.readouterr()

    assert run(tmp_path, config, "short-budget", "storage.retry_s=2") == 3
    watcher.join()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("seggpt-autolabel")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("seggpt-autolabel: error: storage unreachable for 2 s (storage.retry_s) at s3://budget/")

    flaky_s3.start()
    assert run(tmp_path, config, "resumed") == 0
    check_labels("s3://budget/out", flaky_s3.options, tmp_path, images_of(str(tmp_path / "data")))


# --- an inference actor that dies ---------------------------------------------------------------------------------


def as_tar_shards(config: dict, per_shard: int) -> dict:
    """`config` with its loose images packed into WebDataset shards of `per_shard` images: each shard is a block of
    its own, so the model works through many small tasks."""
    images = sorted(Path(config["input"]["uri"]).iterdir())
    shards = Path(config["input"]["uri"] + "-shards")
    shards.mkdir()
    for number, first in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(shards / f"shard{number:02d}.tar", "w") as tar:
            for image in images[first : first + per_shard]:
                tar.add(image, arcname=image.name)
    return {**config, "input": {**config["input"], "uri": str(shards)}}


def inference_actors() -> list[gcs_pb2.ActorTableData]:
    """Every inference actor the Ray session has known (Ray's GCS): its id, state, process and restarts."""
    accessor = ray._private.state.state._connect_and_get_accessor()
    actors = [gcs_pb2.ActorTableData.FromString(data) for data in accessor.get_actor_table(None, None)]
    return [actor for actor in actors if "SegGptPredictor" in actor.class_name]


def test_an_inference_actor_killed_mid_run_and_late_loses_and_doubles_nothing(tmp_path, ray_session):
    """The inference actor is killed twice: once the first labels file is written, and again late, once more than
    half of them are. Each time Ray restarts it, and it rebuilds its model and prompt set from its own arguments.
    The run's actor is found in Ray's actor table (earlier tests' actors are not this run's)."""
    config = as_tar_shards(long_job(tmp_path, 32, image_size=(512, 256)), per_shard=4)
    labels = tmp_path / "out" / "labels"
    earlier = {actor.actor_id for actor in inference_actors()}
    killed: list[int] = []

    def kill_when_labelled(files: int) -> None:
        while len(list(labels.glob("*.parquet"))) < files:
            time.sleep(0.05)
        deadline = time.monotonic() + 60  # a restarted actor may still be starting
        while time.monotonic() < deadline:
            alive = [
                actor.pid
                for actor in inference_actors()
                if actor.actor_id not in earlier
                and actor.state == gcs_pb2.ActorTableData.ALIVE
                and actor.pid
                and actor.pid not in killed
            ]
            if alive:
                os.kill(alive[0], signal.SIGKILL)
                killed.append(alive[0])
                return
            time.sleep(0.05)

    def kill_twice() -> None:
        kill_when_labelled(1)
        # of 16 (32 images, 2 rows a file): past half way, with images left that the model has not had yet (it runs
        # a few batches ahead of the writer)
        kill_when_labelled(9)

    killer = threading.Thread(target=kill_twice, daemon=True)
    killer.start()
    assert run(tmp_path, config, "killed") == 0
    killer.join()

    assert len(killed) == 2, killed  # each kill, the run's one actor (a process of its own each time) ...
    restarts = [actor.num_restarts for actor in inference_actors() if actor.actor_id not in earlier]
    assert sum(restarts) == 2, restarts  # ... which Ray restarted each time
    images = {
        f"shard{i // 4:02d}.tar/{name}": data
        for i, (name, data) in enumerate(sorted(images_of(str(tmp_path / "data")).items()))
    }
    check_labels(str(tmp_path / "out"), {}, tmp_path, images)  # ... and every key is there once, as a clean run


def test_the_model_actor_is_built_from_arguments_it_holds(tmp_path, ray_session):
    """What a restarted actor is rebuilt from: the arguments it was created with. They hold the prompt set itself, not
    a reference to a copy in the driver's object store, which Ray does not keep for a restart
    (ray-project/ray#53727)."""
    job = plan(long_job(tmp_path, 2))
    operator = build_dataset(job)._logical_plan.dag
    while operator.name != "MapBatches(SegGptPredictor)":
        (operator,) = operator.input_dependencies
    arguments = [*operator.fn_constructor_args, *operator.fn_constructor_kwargs.values()]
    assert not [argument for argument in arguments if isinstance(argument, ray.ObjectRef)]
    (prompts,) = [argument for argument in arguments if isinstance(argument, PromptSet)]
    assert prompts.fingerprint == job.prompts.fingerprint
