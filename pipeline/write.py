"""Write stage: result rows to `labels/*.parquet` and `masks/<key>.png`, with resume.

Layout under the output URI::

    labels/part-<sha1 of the file's sorted keys>.parquet   rows of LABELS_SCHEMA, one file per batch
    masks/<key>.png                                        the mask of each ok row (with `png`)
    _job.json, _SUCCESS                                    job description; present when complete
    _staging/                                              local filesystems only: files being written

`labels/` holds only Parquet files of one fixed schema, so pyarrow, pandas and DuckDB
(`read_parquet('labels/*.parquet')`) read the folder as one table.

**Invariant: every key is in `labels/` at most once; after a completed run, exactly once.**
It is kept by these rules:

1. A labels file appears whole or not at all: a local file is written under `_staging/` and renamed
   into place; an object store PUT is atomic. Its name derives from its keys, so a retried write of
   the same batch (a Ray task retry) replaces the file instead of adding one.
2. A row's PNG is written before its labels file, so a key in `labels/` always has its mask.
3. Before a run, `prepare_output` (with resume) runs `clean_labels(drop_errors=True)`: error rows
   are removed (their keys are labelled again) and, should a key be in two files, one row wins
   (`ok` first, then the latest `labeled_at`, then the greatest file name). A file that loses rows is
   rewritten: the new file (named from its remaining keys) is written before the old one is
   deleted, and a file just written is never deleted. A kill at any point leaves each kept row in at
   least one file, and running the cleaning again finishes the job. The keys it returns are skipped.
4. After a run, `clean_labels(drop_errors=False)` removes any duplicate left by a retry that
   re-batched differently (it keeps the latest error row of a key that has no ok row).

A run is therefore: `prepare_output` → read (skipping the returned keys) → … → `LabelWriter` →
`clean_labels(drop_errors=False)` → `write_job_files(success=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

LABELS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mask", pa.binary()),  # indexed PNG
        pa.field("mask_uri", pa.string()),  # set by LabelWriter when it wrote masks/<key>.png
        pa.field("class_ids", pa.list_(pa.int32())),
        pa.field("pixel_counts", pa.list_(pa.int64())),
        pa.field("score", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("prompt_set", pa.string()),
        # labeled_at: a timestamp (naive ones are taken as UTC) or an ISO 8601 string with an offset
        pa.field("labeled_at", pa.timestamp("us", tz="UTC")),
    ]
)
WRITE_RESULT_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("status", pa.string())])
_INDEX_SCHEMA = pa.schema(  # what clean_labels needs to know of each row in labels/
    [
        *(LABELS_SCHEMA.field(name) for name in ("key", "status", "labeled_at")),
        pa.field("file", pa.string()),
        pa.field("row", pa.int64()),  # position in its file
    ]
)

LABELS_DIR = "labels"
MASKS_DIR = "masks"
STAGING_DIR = "_staging"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
_INDEX_THREADS = 16


class LabelWriter:
    """Ray Data UDF: writes a batch of result rows, returns its (key, status) pairs.

    Use with ``ds.map_batches(LabelWriter, fn_constructor_args=(uri, storage_options, png),
    batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(...), num_cpus=...)`` or as an
    instance. Columns outside LABELS_SCHEMA are ignored; `mask_uri` is computed here.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any], png: bool = True):
        self.fs, self.root = fsspec.core.url_to_fs(output_uri, **storage_options)
        self.png = png

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = _conform(batch)
        if table.num_rows == 0:
            return WRITE_RESULT_SCHEMA.empty_table()
        mask_uris = self._write_masks(table) if self.png else pa.nulls(table.num_rows, pa.string())
        table = table.set_column(LABELS_SCHEMA.get_field_index("mask_uri"), "mask_uri", mask_uris)
        name = labels_file_name(table["key"].to_pylist())
        _write_atomically(self.fs, self.root, f"{self.root}/{LABELS_DIR}/{name}", _parquet_bytes(table))
        return table.select(["key", "status"]).cast(WRITE_RESULT_SCHEMA)

    def _write_masks(self, table: pa.Table) -> pa.Array:
        """Write masks/<key>.png for ok rows with a mask; their URIs, null elsewhere."""
        files: dict[str, bytes] = {}
        uris: list[str | None] = []
        for key, status, mask in zip(*(table[name].to_pylist() for name in ("key", "status", "mask"))):
            if status == "ok" and mask is not None:
                path = f"{self.root}/{MASKS_DIR}/{key}.png"
                files[path] = mask
                uris.append(self.fs.unstrip_protocol(path))
            else:
                uris.append(None)
        if isinstance(self.fs, LocalFileSystem):
            for folder in {posixpath.dirname(path) for path in files}:
                self.fs.makedirs(folder, exist_ok=True)
        if files:
            self.fs.pipe(files)
        return pa.array(uris, pa.string())


def labels_file_name(keys: Iterable[str]) -> str:
    """The labels file name for a set of keys: the same keys always give the same name."""
    digest = hashlib.sha1("\0".join(sorted(keys)).encode()).hexdigest()
    return f"part-{digest}.parquet"


def completed_keys(output_uri: str, storage_options: dict[str, Any]) -> set[str]:
    """Keys with an ok row in `labels/` (empty when there is no output yet)."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    index = _read_index(fs, root)
    return set(index.filter(pc.equal(index["status"], "ok"))["key"].to_pylist())


def prepare_output(output_uri: str, storage_options: dict[str, Any], *, resume: bool) -> set[str]:
    """Get the output ready for a run; returns the keys to skip.

    Removes a stale `_SUCCESS` and leftover staging files. With `resume`, cleans `labels/` (error rows
    and duplicates out) and returns the keys already labelled ok; without, deletes `labels/` and
    `masks/` so that the run starts over, and returns no keys.
    """
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    fs.invalidate_cache()
    folders = [STAGING_DIR] if resume else [STAGING_DIR, LABELS_DIR, MASKS_DIR]
    for name in [SUCCESS_FILE, *folders]:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    return clean_labels(output_uri, storage_options, drop_errors=True) if resume else set()


def clean_labels(output_uri: str, storage_options: dict[str, Any], *, drop_errors: bool) -> set[str]:
    """Leave each key in `labels/` once (and, with `drop_errors`, only ok rows); returns the ok keys.

    Safe to run again after being killed midway: see rule 3 in the module docstring.
    """
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    index = _read_index(fs, root)
    if index.num_rows == 0:
        return set()
    index = index.append_column("not_ok", pc.not_equal(index["status"], "ok")).sort_by(
        [
            ("key", "ascending"),
            ("not_ok", "ascending"),  # the winner of each key comes first: ok rows,
            ("labeled_at", "descending"),  # then the latest,
            ("file", "descending"),  # then a fixed order, so that a repeated cleaning agrees
            ("row", "descending"),
        ]
    )
    keys = index["key"].to_numpy(zero_copy_only=False)
    keep = np.ones(len(keys), dtype=bool)
    keep[1:] = keys[1:] != keys[:-1]
    if drop_errors:
        keep &= ~index["not_ok"].to_numpy(zero_copy_only=False)
    kept = index.filter(pa.array(keep))
    counts = index.group_by("file").aggregate([("row", "count")])
    rows_per_file = dict(zip(counts["file"].to_pylist(), counts["row_count"].to_pylist()))
    lists = kept.group_by("file").aggregate([("row", "list")])
    kept_rows = dict(zip(lists["file"].to_pylist(), lists["row_list"].to_pylist()))
    changed = [file for file, count in rows_per_file.items() if len(kept_rows.get(file, ())) != count]
    written = set()
    for file in changed:
        if file in kept_rows:
            table = pq.read_table(io.BytesIO(fs.cat_file(file)))
            table = table.take(sorted(kept_rows[file]))
            target = f"{root}/{LABELS_DIR}/{labels_file_name(table['key'].to_pylist())}"
            _write_atomically(fs, root, target, _parquet_bytes(table))
            written.add(target)
    for file in changed:
        if file not in written:
            fs.rm_file(file)
    return set(kept.filter(pc.invert(kept["not_ok"]))["key"].to_pylist())


def write_job_files(
    output_uri: str, storage_options: dict[str, Any], job_info: dict[str, Any], success: bool
) -> None:
    """Write `_job.json` (`job_info`, which must hold no secrets); `_SUCCESS` only when `success`."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    text = json.dumps(job_info, indent=2, sort_keys=True, default=str) + "\n"
    _write_atomically(fs, root, f"{root}/{JOB_FILE}", text.encode())
    success_path = f"{root}/{SUCCESS_FILE}"
    if success:
        fs.pipe_file(success_path, b"")
    elif fs.exists(success_path):
        fs.rm_file(success_path)


def _conform(batch: pa.Table) -> pa.Table:
    """The batch's columns in LABELS_SCHEMA order and types (`mask_uri` left null)."""
    columns = []
    for field in LABELS_SCHEMA:
        if field.name == "mask_uri":
            columns.append(pa.nulls(batch.num_rows, field.type))
        elif field.name in batch.column_names:
            columns.append(_cast(batch[field.name], field))
        else:
            raise ValueError(f"result rows lack the column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=LABELS_SCHEMA)


def _cast(column: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    """Cast to the field's type; values arrow cannot cast directly (e.g. tensors) go through Python."""
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.chunked_array([pa.array([_python(value) for value in column.to_pylist()], field.type)])


def _python(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_atomically(fs: fsspec.AbstractFileSystem, root: str, path: str, data: bytes) -> None:
    """Make `path` hold `data`, whole or not at all: staging + rename locally, one PUT elsewhere."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    staging = f"{root}/{STAGING_DIR}/{uuid.uuid4().hex}.tmp"
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(staging, "wb") as file:
        file.write(data)
    os.replace(staging, path)


def _read_index(fs: fsspec.AbstractFileSystem, root: str) -> pa.Table:
    """key, status, labeled_at, file and row (position in the file) of every row in `labels/`."""
    fs.invalidate_cache()
    files = sorted(path for path in fs.find(f"{root}/{LABELS_DIR}") if path.endswith(".parquet"))

    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as file:
            table = pq.read_table(file, columns=["key", "status", "labeled_at"])
        rows = table.num_rows
        return table.append_column("file", pa.array([path] * rows, pa.string())).append_column(
            "row", pa.array(np.arange(rows, dtype=np.int64))
        )

    with ThreadPoolExecutor(_INDEX_THREADS) as pool:
        tables = list(pool.map(read, files))
    return pa.concat_tables([_INDEX_SCHEMA.empty_table(), *tables])
