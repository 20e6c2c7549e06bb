"""The files of an output: the labels schema and layout, atomic writes, `_job.json`."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
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
        # mean confidence of each class of class_ids over its pixels (at the model's resolution); absent in files
        # written before it existed
        pa.field("class_scores", pa.list_(pa.float64())),
        pa.field("score", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("prompt_set", pa.string()),
        # labeled_at: a timestamp (naive ones are taken as UTC) or an ISO 8601 string with an offset
        pa.field("labeled_at", pa.timestamp("us", tz="UTC")),
        # images of the row's shard, where known (see pipeline.storage.formats); lets a resume skip finished shards
        pa.field("shard_images", pa.int64()),
    ]
)


# What the model ran with: the infer stage adds these columns to every row it passes, the writer counts them (they
# are not written to labels files: a row's `model` fingerprints the settings that change its pixels).
RAN_COLUMNS = ("ran_device", "ran_dtype", "ran_attention")


LABELS_DIR = "labels"


MASKS_DIR = "masks"


STAGING_DIR = "_staging"


JOB_FILE = "_job.json"


SUCCESS_FILE = "_SUCCESS"


HASHED_DIR = "_hashed"  # files of keys that are not plain relative paths (see key_path)


_MAX_PART_BYTES = 200  # of one path part (filesystems allow 255)


_MAX_KEY_BYTES = 800


def label_batches(
    fs: fsspec.AbstractFileSystem, root: str, columns: list[str], optional: tuple[str, ...] = (), rows: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Every row of the output's `labels/`, `rows` at a time: `columns`, and each of `optional` where a file has it
    (files written before a column existed lack it)."""
    for path in sorted(fs.find(f"{root}/{LABELS_DIR}")):
        with fs.open(path, "rb", cache_type="none") as handle:
            parquet = pq.ParquetFile(handle)
            present = columns + [name for name in optional if name in parquet.schema_arrow.names]
            yield from parquet.iter_batches(rows, columns=present)


def label_rows(
    fs: fsspec.AbstractFileSystem, root: str, columns: list[str], optional: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """`label_batches` row by row (64 rows read at a time)."""
    for batch in label_batches(fs, root, columns, optional, rows=64):
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


def write_job_files(output_uri: str, storage_options: dict[str, Any], job_info: dict[str, Any], success: bool) -> None:
    """Write `_job.json` (`job_info`, which must hold no secrets); `_SUCCESS` only when `success`."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    text = json.dumps(job_info, indent=2, sort_keys=True, default=str) + "\n"
    write_atomically(fs, root, f"{root}/{JOB_FILE}", text.encode())
    success_path = f"{root}/{SUCCESS_FILE}"
    if success:
        fs.pipe_file(success_path, b"")
    elif fs.exists(success_path):
        fs.rm_file(success_path)


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


class OutputError(ValueError):
    """The output cannot take this run: another run holds it, or it holds labels this run would mix with."""
