"""Write stage: result rows to `labels/*.parquet` and `masks/<key>.png`.

Layout under the output URI::

    labels/part-<sha1 of the file's sorted keys>.parquet   rows of LABELS_SCHEMA, one file per batch
                                                           (its ok rows; its error rows in a file of their own)
    masks/<key>.png                                        the mask of each ok row (with `png`); see `key_path`
    _job.json                                              the job and the history of its runs
    _SUCCESS                                               present when the last run completed
    _lease.json                                            held while a run is on (`pipeline.storage.lease`)
    _staging/                                              local filesystems only: files being written

`labels/` holds only Parquet files of one fixed schema, so pyarrow, pandas and DuckDB
(`read_parquet('labels/*.parquet')`) read the folder as one table.

**Invariant: every key is in `labels/` at most once after a completed run.** It is kept by these rules:

1. A labels file appears whole or not at all: a local file is written under `_staging/` and renamed
   into place; an object store PUT is atomic. Its name derives from its keys, so a retried write of
   the same batch (a Ray task retry) replaces the file instead of adding one.
2. A row's PNG is written before its labels file, so a key in `labels/` always has its mask.
3. A run labels only keys without an ok row of its model and prompt set (`pipeline.labelling.plan`), and
   its last step, `pipeline.labelling.plan.clean_labels`, leaves one row per key (rows an earlier run left,
   or a retry that re-batched differently, lose to the newest ok one).
"""

from __future__ import annotations

import functools
import posixpath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.output import (
    LABELS_DIR,
    LABELS_SCHEMA,
    MASKS_DIR,
    RAN_COLUMNS,
    key_path,
    labels_file_name,
    parquet_bytes,
    write_atomically,
)
from pipeline.storage.retry import Retry

WRITE_RESULT_SCHEMA = pa.schema(  # one row per labels file written and what its rows ran with (null: not said)
    [
        pa.field("file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        *(pa.field(name, pa.string()) for name in RAN_COLUMNS),
    ]
)


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
                self.retry(
                    functools.partial(write_atomically, self.fs, self.root, path, data), self.fs.unstrip_protocol(path)
                )
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
    said = {
        name: rows[name] if name in rows.column_names else pa.nulls(rows.num_rows, pa.string()) for name in RAN_COLUMNS
    }
    groups = pa.table({**said, "key": rows["key"]}).group_by(list(RAN_COLUMNS)).aggregate([("key", "count")])
    return [({name: group[name] for name in RAN_COLUMNS}, group["key_count"]) for group in groups.to_pylist()]


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
