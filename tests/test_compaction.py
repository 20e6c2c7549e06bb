"""`output.file_mb`: the labels files a run wrote (one per `rows_per_file` rows) are merged at its end into files of
about that size, ok and error rows apart, so that a large output leaves a resume few files to open; files of
earlier runs are never rewritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.labelling.job import autolabel
from pipeline.labelling.work import LabelsFile, compact_labels, list_labels
from pipeline.storage.retry import Retry
from tests.test_job import TINY, encoded, job_config, make_assets, picture

IMAGES, BAD = 30, 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


def dataset(folder: Path, first: int, count: int, bad: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(first, first + count):
        (folder / f"{i:03d}.jpg").write_bytes(encoded(picture(i, (24 + i % 5, 18))))
    for i in range(bad):
        (folder / f"bad{first + i}.jpg").write_bytes(b"not an image")


def labels_files(output: Path) -> dict[str, pq.ParquetFile]:
    return {path.name: pq.ParquetFile(path) for path in sorted((output / "labels").glob("*.parquet"))}


def statuses_of(file: pq.ParquetFile) -> list[str]:
    return file.read(columns=["status"])["status"].to_pylist()


def has_ok_rows(rows) -> bool:
    return pc.any(pc.equal(rows["status"], "ok")).as_py()


def rows_by_key(output: Path) -> dict[str, dict]:
    table = pq.read_table(output / "labels", columns=["key", "status", "mask", "error"])
    return {row["key"]: row for row in table.to_pylist()}


def test_a_run_merges_the_files_it_wrote_and_never_earlier_ones(assets, tmp_path, ray_session):
    data = tmp_path / "data"
    dataset(data, 0, IMAGES, bad=BAD)
    config = job_config(assets, str(data), str(tmp_path / "out"), {})
    config["output"]["rows_per_file"] = 2

    as_written = tmp_path / "as-written"
    autolabel({**config, "output": {**config["output"], "uri": str(as_written), "file_mb": 0}}, log=print)
    parts = labels_files(as_written)
    assert len(parts) >= IMAGES // 2 + 1  # a file per 2 rows, error rows apart

    # straight on a copy of those files: parts are taken in order until their bytes reach the target
    copy = tmp_path / "copy"
    shutil.copytree(as_written, copy)
    fs = fsspec.filesystem("file")
    files = [
        LabelsFile(path, size, pq.ParquetFile(path).metadata.num_rows, statuses_of(pq.ParquetFile(path)).count("ok"))
        for path, size in list_labels(fs, str(copy)).items()
    ]
    target = sum(file.size for file in files if file.ok) // 3
    after = compact_labels(fs, str(copy), files, earlier=(), target_bytes=target, retry=Retry(5))
    assert sum(file.rows for file in after) == IMAGES + BAD
    assert sorted(file.path for file in after) == sorted(str(path) for path in (copy / "labels").glob("*.parquet"))
    ok_files = [file for file in after if file.ok]
    assert 2 <= len(ok_files) <= 4  # parts of about a third of the bytes each, and what is left
    assert all(file.ok in (0, file.rows) for file in after)  # ok and error rows never share a file
    assert rows_by_key(copy) == rows_by_key(as_written)
    assert list_labels(fs, str(copy)) == {file.path: file.size for file in sorted(after, key=lambda f: f.path)}

    output = tmp_path / "out"
    summary = autolabel(config, log=print)  # file_mb: 128, the default
    assert (summary.ok, summary.error) == (IMAGES, BAD)
    merged = labels_files(output)
    statuses = sorted(tuple(sorted(set(statuses_of(file)))) for file in merged.values())
    assert statuses == [("error",), ("ok",)]  # one file of ok rows, one of error rows
    assert rows_by_key(output) == rows_by_key(as_written)  # the same rows, masks byte for byte

    (ok_file,) = [name for name, file in merged.items() if "ok" in statuses_of(file)]
    written_at = (output / "labels" / ok_file).stat().st_mtime_ns
    dataset(data, IMAGES, 10)
    second = autolabel(config, log=print)  # labels the new images, and the bad files again
    assert (second.ok, second.error, second.skipped) == (10, BAD, IMAGES)
    now = labels_files(output)
    assert len(now) == 3 and (output / "labels" / ok_file).stat().st_mtime_ns == written_at  # the first run's ok rows
    new_ok = [file for name, file in now.items() if name != ok_file and "ok" in statuses_of(file)]
    assert [file.metadata.num_rows for file in new_ok] == [10]  # the second run's 5 files, merged
