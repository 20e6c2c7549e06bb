"""Write stage: result rows to `labels/*.parquet` and `masks/<key>.png`.

Layout under the output URI::

    labels/part-<sha1 of the file's sorted keys>.parquet   rows of LABELS_SCHEMA, one file per batch
                                                           (its ok rows; its error rows in a file of their own)
    masks/<key>.png                                        the mask of each ok row (with `png`); see `key_path`
    _job.json                                              the job and the history of its runs
    _SUCCESS                                               present when the last run completed
    _lease.json                                            held while a run is on (`pipeline.lease`)
    _staging/                                              local filesystems only: files being written

`labels/` holds only Parquet files of one fixed schema, so pyarrow, pandas and DuckDB
(`read_parquet('labels/*.parquet')`) read the folder as one table.

**Invariant: every key is in `labels/` at most once after a completed run.** It is kept by these rules:

1. A labels file appears whole or not at all: a local file is written under `_staging/` and renamed
   into place; an object store PUT is atomic. Its name derives from its keys, so a retried write of
   the same batch (a Ray task retry) replaces the file instead of adding one.
2. A row's PNG is written before its labels file, so a key in `labels/` always has its mask.
3. A run labels only keys without an ok row of its model and prompt set (`pipeline.resume`), and
   its last step, `pipeline.resume.clean_labels`, leaves one row per key (rows an earlier run left,
   or a retry that re-batched differently, lose to the newest ok one).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import Retry

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
        # mean confidence of each class of class_ids over its pixels (at the model's resolution); absent in files
        # written before it existed
        pa.field("class_scores", pa.list_(pa.float64())),
        pa.field("score", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("prompt_set", pa.string()),
        # labeled_at: a timestamp (naive ones are taken as UTC) or an ISO 8601 string with an offset
        pa.field("labeled_at", pa.timestamp("us", tz="UTC")),
        # images of the row's shard, where known (see pipeline.read); lets a resume skip finished shards
        pa.field("shard_images", pa.int64()),
    ]
)
# What the model ran with: the infer stage adds these columns to every row it passes, the writer counts them (they
# are not written to labels files: a row's `model` fingerprints the settings that change its pixels).
RAN_COLUMNS = ("ran_device", "ran_dtype", "ran_attention")
WRITE_RESULT_SCHEMA = pa.schema(  # one row per labels file written and what its rows ran with (null: not said)
    [pa.field("file", pa.string()), pa.field("rows", pa.int64()), pa.field("ok", pa.int64()),
     *(pa.field(name, pa.string()) for name in RAN_COLUMNS)]
)

LABELS_DIR = "labels"
MASKS_DIR = "masks"
STAGING_DIR = "_staging"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
HASHED_DIR = "_hashed"  # files of keys that are not plain relative paths (see key_path)
_MAX_PART_BYTES = 200  # of one path part (filesystems allow 255)
_MAX_KEY_BYTES = 800


class LabelWriter:
    """Ray Data UDF: writes a batch of result rows; returns a `WRITE_RESULT_SCHEMA` row per file written.

    Use with ``ds.map_batches(LabelWriter, fn_constructor_args=(uri, storage_options, png, retry),
    batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(...), num_cpus=...)`` or as an
    instance. Columns outside LABELS_SCHEMA are not written (`RAN_COLUMNS` are counted in the result);
    `mask_uri` is computed here. The ok rows of a batch go to one file and its error rows to another, so
    that relabelling an error row later never rewrites a file of masks. Every write goes through `retry`
    (past its budget: `StorageUnavailable`).
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any], png: bool = True, retry: Retry = Retry()):
        self.fs, self.root = fsspec.core.url_to_fs(output_uri, **storage_options)
        self.png, self.retry = png, retry

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = _conform(batch)
        mask_uris = self._write_masks(table) if self.png else pa.nulls(table.num_rows, pa.string())
        table = table.set_column(LABELS_SCHEMA.get_field_index("mask_uri"), "mask_uri", mask_uris)
        ok = pc.equal(table["status"], "ok")
        written = []
        for status, selected in (("ok", ok), ("error", pc.invert(ok))):
            part = table.filter(selected)
            if part.num_rows:
                name, data = labels_file_name(part["key"].to_pylist()), parquet_bytes(part)
                path = f"{self.root}/{LABELS_DIR}/{name}"
                self.retry(lambda: write_atomically(self.fs, self.root, path, data), self.fs.unstrip_protocol(path))
                for ran, rows in _ran_counts(batch.filter(selected)):
                    written.append({"file": name, "rows": rows, "ok": rows if status == "ok" else 0, **ran})
        return pa.Table.from_pylist(written, schema=WRITE_RESULT_SCHEMA)

    def _write_masks(self, table: pa.Table) -> pa.Array:
        """Write masks/<key>.png for ok rows with a mask; their URIs, null elsewhere."""
        files: dict[str, bytes] = {}
        uris: list[str | None] = []
        for key, status, mask in zip(*(table[name].to_pylist() for name in ("key", "status", "mask"))):
            if status == "ok" and mask is not None:
                path = f"{self.root}/{MASKS_DIR}/{key_path(key, '.png')}"
                files[path] = mask
                uris.append(self.fs.unstrip_protocol(path))
            else:
                uris.append(None)
        if isinstance(self.fs, LocalFileSystem):
            for folder in {posixpath.dirname(path) for path in files}:
                self.fs.makedirs(folder, exist_ok=True)
        if files:
            self.retry(lambda: self.fs.pipe(files), self.fs.unstrip_protocol(f"{self.root}/{MASKS_DIR}"))
        return pa.array(uris, pa.string())


def _ran_counts(rows: pa.Table) -> list[tuple[dict[str, str | None], int]]:
    """The `RAN_COLUMNS` values of `rows` (null where the rows do not say) and how many rows have each."""
    said = {name: rows[name] if name in rows.column_names else pa.nulls(rows.num_rows, pa.string())
            for name in RAN_COLUMNS}
    groups = pa.table({**said, "key": rows["key"]}).group_by(list(RAN_COLUMNS)).aggregate([("key", "count")])
    return [({name: group[name] for name in RAN_COLUMNS}, group["key_count"]) for group in groups.to_pylist()]


def label_rows(
    fs: fsspec.AbstractFileSystem, root: str, columns: list[str], optional: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """Every row of the output's `labels/`, read 64 at a time: `columns`, and each of `optional` where a file has it
    (files written before a column existed lack it)."""
    for path in sorted(fs.find(f"{root}/{LABELS_DIR}")):
        with fs.open(path, "rb", cache_type="none") as handle:
            parquet = pq.ParquetFile(handle)
            present = columns + [name for name in optional if name in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(64, columns=present):
                yield from batch.to_pylist()


def key_path(key: str, suffix: str) -> str:
    """Where the file of `key` goes below an output folder (`masks/`, `overlays/`): the key plus `suffix` where the
    key is a plain relative path, else `_hashed/<sha256 of the key><suffix>`. No key can so name a place outside the
    folder or one a filesystem refuses: `..`, `.` or empty parts, a leading `/`, backslashes, control and other
    unprintable characters, a part over 200 bytes or a key over 800 (S3 allows 1024, prefix included).
    Keys always end in an image extension or a row number, so no plain key looks like a hashed one."""
    parts = key.split("/")
    plain = (
        key.isprintable()
        and "\\" not in key
        and len(key.encode()) <= _MAX_KEY_BYTES
        and all(part not in ("", ".", "..") and len(part.encode()) <= _MAX_PART_BYTES for part in parts)
    )
    if plain:
        return key + suffix
    return f"{HASHED_DIR}/{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}{suffix}"


def labels_file_name(keys: Iterable[str]) -> str:
    """The labels file name for a set of keys: the same keys always give the same name."""
    digest = hashlib.sha1("\0".join(sorted(keys)).encode()).hexdigest()
    return f"part-{digest}.parquet"


def prepare_output(fs: fsspec.AbstractFileSystem, root: str, *, resume: bool) -> None:
    """Get the output ready for a run: remove a stale `_SUCCESS` and staging leftovers, and without
    `resume` the old `labels/` and `masks/` too (the run starts over)."""
    fs.invalidate_cache()
    folders = [STAGING_DIR] if resume else [STAGING_DIR, LABELS_DIR, MASKS_DIR]
    for name in [SUCCESS_FILE, *folders]:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    fs.invalidate_cache()


def read_job_file(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any]:
    """The output's `_job.json`, or {} when there is none (or it is not readable JSON)."""
    try:
        return json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))
    except (FileNotFoundError, ValueError):
        return {}


def write_job_files(
    output_uri: str, storage_options: dict[str, Any], job_info: dict[str, Any], success: bool
) -> None:
    """Write `_job.json` (`job_info`, which must hold no secrets); `_SUCCESS` only when `success`."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    text = json.dumps(job_info, indent=2, sort_keys=True, default=str) + "\n"
    write_atomically(fs, root, f"{root}/{JOB_FILE}", text.encode())
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


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_atomically(fs: fsspec.AbstractFileSystem, root: str, path: str, data: bytes) -> None:
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
