"""Safety: no input name can make the job write outside `output.uri`, and credentials never reach what the job
writes or says (logs, progress, errors, `_job.json`, rows, Ray's own log files). Decompression bombs: see
test_preprocess; checkpoints that would run code when unpickled: see test_checkpoint."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from jobs.cli import main as cli
from model.processing import decode_png
from pipeline.labelling.job import autolabel
from pipeline.storage.output import key_path
from tests.test_job import TINY, encoded, expected_map, job_config, make_assets, picture, read_labels


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


LONG = "l" * 240 + ".jpg"  # a name the filesystem takes, but too long to be a part of a mask's path here


@pytest.mark.parametrize(
    "key",
    [
        "../x.jpg",
        "a/../../x.jpg",
        "/etc/x.jpg",
        "a\\..\\..\\x.jpg",
        "a\x00.jpg",
        "a\n.jpg",
        "a\x1b[31m.jpg",
        "a//x.jpg",
        "./x.jpg",
        "a/./x.jpg",
        "x" * 300 + ".jpg",
        "/".join(["d" * 150] * 6) + ".jpg",
        "a\u2028.jpg",
    ],
)
def test_keys_that_are_not_plain_paths_get_a_hashed_name(key):
    path = key_path(key, ".png")
    assert path.startswith("_hashed/") and len(path) == len("_hashed/") + 64 + 4 and path[8:-4].isalnum()
    assert key_path(key, ".png") == path and key_path(key + "y", ".png") != path  # stable, and one per key


def test_plain_keys_keep_their_names():
    assert key_path("day1/cam 2/img_001.JPG", ".png") == "day1/cam 2/img_001.JPG.png"
    assert key_path("shard.tar/x/été.jpg", ".jpg") == "shard.tar/x/été.jpg.jpg"
    assert key_path("shard.parquet/17", ".png") == "shard.parquet/17.png"


def tar_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def every_file(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_no_input_name_writes_outside_the_output(assets, tmp_path, ray_session):
    data, out = tmp_path / "data", tmp_path / "nest" / "out"
    (data / "sub").mkdir(parents=True)
    images = [encoded(picture(i, (20 + i, 16))) for i in range(12)]
    loose = {
        "back\\..\\..\\slash.jpg": images[0],
        "ctrl\x1b[2J.jpg": images[1],
        "new\nline.jpg": images[2],
        LONG: images[3],
        "sub/plain.jpg": images[4],
    }
    for name, payload in loose.items():
        (data / name).write_bytes(payload)
    members = {
        "/abs/a.jpg": images[5],
        "../up.jpg": images[6],
        "x/../../up2.jpg": images[7],
        "back\\up\\m.jpg": images[8],
        "tab\there.jpg": images[9],
        "m" * 300 + ".jpg": images[10],
        "./dot/a.jpg": images[11],
    }
    (data / "s.tar").write_bytes(tar_with(members))
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": images[0], "path": "../../../outside.jpg"}, {"bytes": images[1], "path": "/etc/passwd"}]
            )
        }
    )
    pq.write_table(table, data / "p.parquet")
    before = every_file(tmp_path)

    summary = autolabel(job_config(assets, str(data), str(out), {}), log=lambda line: None)

    expected = {
        **loose,
        "s.tar/abs/a.jpg": images[5],
        "s.tar/back\\up\\m.jpg": images[8],
        "s.tar/tab\there.jpg": images[9],
        "s.tar/" + "m" * 300 + ".jpg": images[10],
        "s.tar/dot/a.jpg": images[11],
        "p.parquet/0": images[0],
        "p.parquet/1": images[1],
    }
    assert (summary.ok, summary.error) == (len(expected), 0)  # names that leave a tar are not images of it
    new = every_file(tmp_path) - before
    assert new and all(out in path.parents for path in new), sorted(
        map(str, new - {p for p in new if out in p.parents})
    )
    rows = {row["key"]: row for row in read_labels(str(out), {}).to_pylist()}
    assert sorted(rows) == sorted(expected)
    for key, payload in expected.items():
        mask_file = Path(fsspec.core.strip_protocol(rows[key]["mask_uri"]))
        assert (out / "masks") in mask_file.parents and mask_file.read_bytes() == rows[key]["mask"]
        assert np.array_equal(decode_png(rows[key]["mask"]), expected_map(assets, payload))


# --- secrets ------------------------------------------------------------------------------------------------------

ACCESS_KEY = "AKIAQUITERECOGNISABLE"
SECRET = "s3cr3t-Recognisable-7Hq2"


def ray_log_text() -> str:
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "".join(path.read_text(errors="replace") for path in logs.rglob("*") if path.is_file())


def test_credentials_never_reach_logs_errors_job_file_or_rows(
    assets, s3_bucket, ray_session, tmp_path, capfd, monkeypatch
):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for i in range(5):
        fs.pipe_file(f"{bucket}/data/{i}.jpg", encoded(picture(i, (24, 20))))
    fs.pipe_file(f"{bucket}/data/broken.jpg", b"\xff\xd8\xff not really a JPEG")
    secret_options = {**options, "key": ACCESS_KEY, "secret": SECRET}  # moto takes any credentials
    config = job_config(assets, f"{bucket}/data", f"{bucket}/out", secret_options)
    config["storage_options"]["client_kwargs"] = {**options["client_kwargs"], "aws_session_token": SECRET + "-token"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    capfd.readouterr()

    lines: list[str] = []
    summary = autolabel(path, log=lines.append, progress_every_s=0)  # with a bad image: an error row and its message
    lines.append(str(summary))  # what the CLI prints at the end
    assert cli(["run", str(path), "--set", f"input.uri={bucket}/nothing-here/"]) == 2  # a refusal's message
    # credentials from the driver's environment instead (Ray's workers started before: the dry run checks and
    # counts everything on the driver)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-env")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY + "ENV")
    env_config = {**config, "storage_options": {"client_kwargs": options["client_kwargs"]}}
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env_config))
    assert cli(["run", str(tmp_path / "env.yaml"), "--dry-run"]) == 0
    printed = capfd.readouterr()

    rows = read_labels(f"{bucket}/out", options).to_pylist()
    assert any(row["status"] == "error" and row["error"] for row in rows) and len(rows) == 6
    job_file = fs.cat_file(f"{bucket}/out/_job.json").decode()
    assert json.loads(fs.cat_file(f"{bucket}/out/_job.json"))["config"]["storage_options"]["secret"] == "***"
    said = {
        "stdout": printed.out,
        "stderr": printed.err,
        "log lines": "\n".join(lines),
        "_job.json": job_file,
        "rows": repr(rows),
        "Ray's logs": ray_log_text(),
    }
    assert "progress: labelled" in said["log lines"] and "error:" in said["stderr"] and '"images": 6' in printed.out
    for where, text in said.items():
        for secret in (ACCESS_KEY, SECRET):
            assert secret not in text, f"{secret} in {where}"
