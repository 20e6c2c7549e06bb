"""The synthetic data of the `plan` benchmark, made once and reused: a local tree of empty `.jpg` inputs, and an
output whose `labels/` holds rows as the job writes them (256-row files, error rows in files of their own, a mask
of random bytes per ok row)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PLAN_MODEL = "bench-model-0123456789ab"  # the fingerprints of the synthetic labels, and of the planning run
PLAN_PROMPT_SET = "bench-prompts-0123456789"
PLAN_ROWS_PER_FILE = 256  # the job's default output.rows_per_file
PLAN_ERROR_EVERY = 100  # key i is an error row when i % 100 == 99: 1% of the keys
PLAN_MAX_FOLDERS = 1000
_SYNTH_THREADS = 8


def plan_key(i: int, inputs: int) -> str:
    """The key of input number `i` of `inputs`: `d<folder>/img<index in folder>.jpg`, in key order."""
    per_folder = math.ceil(inputs / min(PLAN_MAX_FOLDERS, inputs))
    return f"d{i // per_folder:04d}/img{i % per_folder:06d}.jpg"


def plan_error_indices(rows: int) -> np.ndarray:
    """The indices of the labelled keys that are error rows."""
    return np.arange(PLAN_ERROR_EVERY - 1, rows, PLAN_ERROR_EVERY)


def plan_expected_pending(inputs: int, rows: int) -> list[str]:
    """The keys a run over the synthetic data must still label: the error rows' and the unlabelled inputs'."""
    indices = [*plan_error_indices(min(inputs, rows)).tolist(), *range(min(inputs, rows), inputs)]
    return sorted(plan_key(i, inputs) for i in indices)


def synthesise_plan_data(
    directory: Path,
    inputs: int,
    rows: int,
    mask_bytes: int,
    log: Callable[[str], None] = print,
    *,
    manifest: bool = False,
    file_mb: float = 0,
) -> dict[str, float]:
    """`directory/inputs/` (empty .jpg files) and `directory/out/labels/` (rows as the job writes them); with
    `manifest`, `directory/manifest.parquet` (the inputs' keys) instead of the files; with `file_mb`, the labels
    files merged as a run merges the files it wrote (`output.file_mb`).

    Each part is made once: a marker file (outside both trees) records what it holds, and a rerun with the same
    sizes reuses it. Returns the seconds spent on each part (0 when reused).
    """
    directory.mkdir(parents=True, exist_ok=True)
    made = {"inputs_s": 0.0, "labels_s": 0.0}
    want_inputs = {"inputs": inputs}
    marker = directory / ("manifest.done.json" if manifest else "inputs.done.json")
    if manifest and _marker(marker) != want_inputs:
        start = time.perf_counter()
        _write_manifest(directory / "manifest.parquet", inputs)
        marker.write_text(json.dumps(want_inputs))
        made["inputs_s"] = time.perf_counter() - start
        log(f"synthesised a manifest of {inputs} keys in {made['inputs_s']:.1f} s")
    if not manifest and _marker(marker) != want_inputs:
        start = time.perf_counter()
        _write_inputs(directory / "inputs", inputs)
        (directory / "inputs.done.json").write_text(json.dumps(want_inputs))
        made["inputs_s"] = time.perf_counter() - start
        log(f"synthesised {inputs} inputs in {made['inputs_s']:.1f} s")
    want_labels = {"inputs": inputs, "rows": rows, "mask_bytes": mask_bytes, "rows_per_file": PLAN_ROWS_PER_FILE}
    want_labels.update({"file_mb": file_mb} if file_mb else {})
    if _marker(directory / "labels.done.json") != want_labels:
        start = time.perf_counter()
        _write_labels(directory / "out", directory / "inputs", inputs, rows, mask_bytes)
        if file_mb:
            _compact_labels(directory / "out", file_mb)
        (directory / "labels.done.json").write_text(json.dumps(want_labels))
        made["labels_s"] = time.perf_counter() - start
        log(f"synthesised {rows} labelled rows in {made['labels_s']:.1f} s")
    return made


def _marker(path: Path) -> dict | None:
    """What a marker file says was made, or None when there is none (or half-written)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_inputs(folder: Path, inputs: int) -> None:
    """`inputs` empty files `plan_key(i)` under `folder`, made afresh, in `PLAN_MAX_FOLDERS` folders at most."""
    marker = folder.parent / "inputs.done.json"
    marker.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    folders = min(PLAN_MAX_FOLDERS, inputs)
    per_folder = math.ceil(inputs / folders)

    def make_folder(number: int) -> None:
        path = folder / f"d{number:04d}"
        path.mkdir(parents=True)
        for i in range(number * per_folder, min(inputs, (number + 1) * per_folder)):
            os.close(os.open(folder / plan_key(i, inputs), os.O_CREAT | os.O_WRONLY, 0o644))

    with ThreadPoolExecutor(_SYNTH_THREADS) as pool:
        list(pool.map(make_folder, range(folders)))


def _write_manifest(path: Path, inputs: int) -> None:
    """A Parquet manifest of the keys `plan_key(i)`, written a million at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([pa.field("key", pa.string())])) as writer:
        for first in range(0, inputs, 1_000_000):
            keys = [plan_key(i, inputs) for i in range(first, min(inputs, first + 1_000_000))]
            writer.write_table(pa.table({"key": pa.array(keys, pa.string())}))


def _compact_labels(out: Path, file_mb: float) -> None:
    """Merge `out`'s labels files into files of about `file_mb`, through the job's compaction on a local Ray."""
    import ray
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.labelling.work import LabelsFile, compact_labels, list_labels
    from pipeline.storage.retry import Retry

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        fs = LocalFileSystem()
        files = [LabelsFile(path, size, *_row_counts(path)) for path, size in list_labels(fs, str(out)).items()]
        compact_labels(fs, str(out), files, (), int(file_mb * 2**20), Retry(60))
    finally:
        if started:
            ray.shutdown()


def _row_counts(path: str) -> tuple[int, int]:
    """The rows and ok rows of a labels file."""
    import pyarrow.parquet as pq

    status = pq.read_table(path, columns=["status"])["status"]
    return len(status), pc.sum(pc.equal(status, "ok")).as_py() or 0


def _write_labels(out: Path, inputs_folder: Path, inputs: int, rows: int, mask_bytes: int) -> None:
    """`rows` rows in batches of 256 through the job's `LabelWriter` (png=False): ok rows to one file, error rows
    to one of their own. Each batch is built as Arrow arrays (no Python object per mask)."""
    from pipeline.labelling.write import LabelWriter

    (out.parent / "labels.done.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    writer = LabelWriter(str(out), {}, png=False)
    source_prefix = f"file://{inputs_folder.resolve()}/"
    start_us = int(datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp() * 1e6)

    def write_batch(first: int) -> None:
        indices = np.arange(first, min(rows, first + PLAN_ROWS_PER_FILE))
        writer(_labels_batch(indices, inputs, mask_bytes, source_prefix, start_us))

    with ThreadPoolExecutor(_SYNTH_THREADS) as pool:
        list(pool.map(write_batch, range(0, rows, PLAN_ROWS_PER_FILE)))


def _labels_batch(indices: np.ndarray, inputs: int, mask_bytes: int, source_prefix: str, start_us: int) -> pa.Table:
    """The label rows of the keys numbered `indices`, typed as `LABELS_SCHEMA` less `mask_uri`."""
    from pipeline.storage.output import LABELS_SCHEMA

    n = len(indices)
    error = indices % PLAN_ERROR_EVERY == PLAN_ERROR_EVERY - 1
    ok = ~error
    rng = np.random.default_rng(int(indices[0]))
    keys = pa.array([plan_key(int(i), inputs) for i in indices], pa.string())
    lengths = np.where(ok, mask_bytes, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    validity = pa.py_buffer(np.packbits(ok, bitorder="little"))
    data = pa.py_buffer(rng.bytes(int(offsets[-1])))  # random: incompressible, as PNG bytes nearly are
    masks = pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets), data])
    classes = 3
    list_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * classes)
    pixels = rng.integers(0, 448 * 448 // classes, n * classes)
    columns = {
        "key": keys,
        "source": pc.binary_join_element_wise(source_prefix, keys, ""),
        "status": pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
        "error": pa.array(np.where(ok, None, "OSError: synthetic read failure").tolist(), pa.string()),
        "width": pa.array(np.full(n, 640, np.int32), mask=error),
        "height": pa.array(np.full(n, 480, np.int32), mask=error),
        "mask": masks,
        "class_ids": pa.ListArray.from_arrays(
            list_offsets, pa.array(np.tile(np.arange(classes, dtype=np.int32), n)), mask=pa.array(error)
        ),
        "pixel_counts": pa.ListArray.from_arrays(list_offsets, pa.array(pixels.astype(np.int64)), mask=pa.array(error)),
        "class_scores": pa.ListArray.from_arrays(list_offsets, pa.array(rng.random(n * classes)), mask=pa.array(error)),
        "score": pa.array(rng.random(n), mask=error),
        "model": pa.array([PLAN_MODEL] * n, pa.string()),
        "prompt_set": pa.array([PLAN_PROMPT_SET] * n, pa.string()),
        "labeled_at": pa.array(start_us + indices.astype(np.int64), pa.timestamp("us", tz="UTC")),
        "shard_images": pa.nulls(n, pa.int64()),
    }
    return pa.table({name: columns[name] for name in LABELS_SCHEMA.names if name != "mask_uri"})
