"""The planning benchmark at a small size (`python -m jobs.benchmark plan`): what it measures holds.

On synthetic data made the way the job writes it, the resume index reads a small share of `labels/` (footers and
the index columns, never the masks), and planning (on Ray) lists every input and finds exactly the error rows
pending.
"""

from __future__ import annotations

import os

from jobs.benchmark.plan import CountingFileSystem, plan_steps
from jobs.benchmark.plan_data import PLAN_ROWS_PER_FILE, plan_expected_pending, plan_key, synthesise_plan_data

INPUTS = ROWS = 2000
MASK_BYTES = 16_000  # an ok file is ~4 MB, nearly all mask bytes
MAX_INDEX_SHARE = 0.10  # the index's reads (footer, ~64 KiB tail read, index columns) against labels/'s size


def test_plan_reads_little_and_finds_the_error_keys(tmp_path, ray_session):
    synthesise_plan_data(tmp_path, INPUTS, ROWS, MASK_BYTES, log=lambda line: None)
    labels = tmp_path / "out" / "labels"
    sizes = [entry.stat().st_size for entry in os.scandir(labels)]
    batches = -(-ROWS // PLAN_ROWS_PER_FILE)
    assert len(sizes) == 2 * batches  # each batch: its ok rows in one file, its error rows in another

    fs = CountingFileSystem()
    numbers, work = plan_steps(str(tmp_path / "inputs"), str(tmp_path / "out"), fs)

    assert numbers["listed"] == INPUTS
    assert numbers["index_rows"] == ROWS
    assert 0 < fs.bytes_read < MAX_INDEX_SHARE * sum(sizes), (fs.bytes_read, sum(sizes))
    pending = work["key"].to_pylist()
    assert pending == plan_expected_pending(INPUTS, ROWS)
    assert len(pending) == ROWS // 100  # 1% error rows, every other key done
    assert numbers["skipped"] == ROWS - len(pending)
    assert numbers["index_files_opened"] == numbers["index_files"] == len(sizes)

    # the same data is reused, not made again
    assert synthesise_plan_data(tmp_path, INPUTS, ROWS, MASK_BYTES, log=lambda line: None) == {
        "inputs_s": 0.0,
        "labels_s": 0.0,
    }


def test_counting_filesystem_counts_read_and_readinto(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    fs = CountingFileSystem()
    with fs.open(str(path), "rb") as handle:
        handle.read(100)
        handle.readinto(bytearray(300))
        handle.seek(990)
        handle.read()
    assert fs.bytes_read == 410 and fs.files_opened == 1
    assert CountingFileSystem() is not fs  # a counter of its own, not fsspec's cached instance


def test_plan_keys_sort_as_the_inputs():
    keys = [plan_key(i, INPUTS) for i in range(INPUTS)]
    assert keys == sorted(keys) and len(set(keys)) == INPUTS
    assert plan_key(456, 1_000_000) == "d0000/img000456.jpg" and plan_key(123_456, 1_000_000) == "d0123/img000456.jpg"


def test_plan_from_a_manifest_lists_nothing_and_finds_the_same_work(tmp_path, ray_session):
    synthesise_plan_data(tmp_path, INPUTS, ROWS, 100, log=lambda line: None, manifest=True)
    assert not (tmp_path / "inputs").exists()  # only the manifest says what the inputs are

    manifest = str(tmp_path / "manifest.parquet")
    numbers, work = plan_steps(str(tmp_path / "inputs"), str(tmp_path / "out"), CountingFileSystem(), manifest)

    assert numbers["listed"] == INPUTS
    assert work["key"].to_pylist() == plan_expected_pending(INPUTS, ROWS)
    assert work["source"][0].as_py() == f"file://{tmp_path}/inputs/{work['key'][0].as_py()}"


def test_plan_over_merged_labels_files_finds_the_same_work(tmp_path, ray_session):
    synthesise_plan_data(tmp_path, INPUTS, ROWS, 100, log=lambda line: None, manifest=True, file_mb=0.05)
    files = list((tmp_path / "out" / "labels").glob("*.parquet"))
    assert 2 < len(files) < -(-ROWS // PLAN_ROWS_PER_FILE)  # merged: fewer than half of the 2 per batch written

    manifest = str(tmp_path / "manifest.parquet")
    numbers, work = plan_steps(str(tmp_path / "inputs"), str(tmp_path / "out"), CountingFileSystem(), manifest)

    assert numbers["index_files"] == len(files) and numbers["index_rows"] == ROWS
    assert work["key"].to_pylist() == plan_expected_pending(INPUTS, ROWS)
