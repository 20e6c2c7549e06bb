"""Reading datasets: the files and shards that `pipeline.storage.listing` lists, streamed and retried.

- **images**: a loose file is read whole.
- **webdataset**: `.tar` (or `.tar.gz`/`.tgz`) shards, read member by member (`tar_members`, `tar_samples`).
  Following the WebDataset convention a member `dir/0001.seg.png` has the sample prefix `dir/0001` and the field
  `seg.png`, and a sample is the adjacent members of one prefix; the members whose field is exactly an image
  extension (`0001.jpg`, not `0001.seg.png`) are its images. A repeated member name (the first copy is read) and
  names that leave the archive (`../x.jpg`) are ignored.
- **parquet**: `.parquet` shards, read in batches of 16 rows of the columns asked for (`parquet_rows`: a reader holds
  about one row group's column chunks; a row group whose rows are all passed over is not read at all). A column holds
  raw bytes or the Hugging Face datasets struct `{bytes, path}`.

No shard is held whole. `resumable` re-opens a shard after a transient storage error (`pipeline.storage.retry.Retry`,
within its budget) and continues after the rows it already gave. The labelled pairs of `pipeline.storage.pairs` are
read by the same functions.

The job's read stage (`read_inputs`) gives rows of `READ_SCHEMA`: `key`, `source` (the full URI of the file or
shard), `bytes` (the encoded image; empty when the read failed), `error` (null, or why the read failed) and
`shard_images`: the number of images of the row's shard, set on (at least) the row of its last image (every row of a
Parquet shard), 0 where not known (loose files, the other rows of a tar shard). Rows carry it into `labels/`, so that
a later run knows a shard whose images are all done without opening it. A file that cannot be read yields an error
row, never an exception. A shard that cannot be opened, or breaks part-way (a corrupt tar, a Parquet file without the
image column), yields one error row keyed by the shard's own key, after the rows read before the break.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from pipeline.storage.listing import IMAGE_EXTENSIONS, SHARD_MEMBER_KEY, TAR_SUFFIXES
from pipeline.storage.retry import Retry

T = TypeVar("T")

READ_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("shard_images", pa.int64(), nullable=False),
    ]
)

_IMAGES_PER_BLOCK = 64  # loose files read by one task ...
_FETCH_THREADS = 16  # ... this many at a time
_FLUSH_ROWS = 256  # rows per output table of a read task ...
_FLUSH_BYTES = 64 << 20  # ... or fewer, once their bytes reach this
_PARQUET_BATCH_ROWS = 16  # images of 1 MB: a batch of 16 MB, beside the row group's column chunks

Cell = tuple[bytes | None, str | None]  # a value of a bytes column: (bytes, the path of a `{bytes, path}` struct)
# A shard's images for the read stage: (member name or row index, (bytes or None, error or None, shard_images))
ShardImages = Iterator[tuple[str, tuple[bytes | None, str | None, int]]]


class TarMember(NamedTuple):
    """A file member of a tar shard: its normalised name, sample prefix and field, and how to read its bytes."""

    name: str
    prefix: str
    field: str
    read: Callable[[], bytes]


class TarSample(NamedTuple):
    """The members of one sample (adjacent members of one prefix): bytes by field, None where not asked for."""

    prefix: str
    fields: dict[str, bytes | None]


class ParquetRow(NamedTuple):
    """One row of a Parquet shard: its index (as a key names it), a cell per column asked for, the shard's rows."""

    index: str
    cells: tuple[Cell, ...]
    shard_rows: int


# --- shards, streamed -------------------------------------------------------------------------


def tar_members(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[TarMember]:
    """The file members of a tar shard in archive order, read as a stream: a member's `read` is only good until the
    next member is taken."""
    seen: set[str] = set()
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            name = _member_name(info)
            if name is None or name in seen:
                continue
            seen.add(name)
            yield TarMember(name, *_split_member(name), partial(_extract, tar, info))


def tar_samples(fs: fsspec.AbstractFileSystem, path: str, wanted: Callable[[str, str], bool]) -> Iterator[TarSample]:
    """The samples of a tar shard in archive order; a member's bytes are read only where `wanted(prefix, field)`."""
    sample: TarSample | None = None
    for member in tar_members(fs, path):
        if sample is None or member.prefix != sample.prefix:
            if sample is not None:
                yield sample
            sample = TarSample(member.prefix, {})
        sample.fields[member.field] = member.read() if wanted(member.prefix, member.field) else None
    if sample is not None:
        yield sample


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    return tar.extractfile(info).read()


def _split_member(name: str) -> tuple[str, str]:
    """(sample prefix, field) of a tar member's name: `dir/0001.seg.png` -> (`dir/0001`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, field


def is_image_field(field: str) -> bool:
    return field.lower() in IMAGE_EXTENSIONS


def _member_name(info: tarfile.TarInfo) -> str | None:
    """The normalised name of a file member, or None for other members and names that leave the archive."""
    if not info.isfile():
        return None
    name = posixpath.normpath(info.name).lstrip("/")
    return None if name == ".." or name.startswith("../") else name


def parquet_rows(
    fs: fsspec.AbstractFileSystem, path: str, columns: list[str], done: Container[str] = ()
) -> Iterator[ParquetRow]:
    """The rows of a Parquet shard whose index is not in `done`, streamed in batches of the `columns` (bytes or the
    `{bytes, path}` struct; ValueError for a column that is neither)."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        readers = {column: _cells_reader(parquet.schema_arrow, column) for column in columns}
        shard_rows, start = parquet.metadata.num_rows, 0
        for group in range(parquet.num_row_groups):
            indices = range(start, start + parquet.metadata.row_group(group).num_rows)
            start = indices.stop
            if all(str(index) in done for index in indices):
                continue
            index = indices.start
            for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=columns):
                for cells in zip(*(read(batch.column(column)) for column, read in readers.items())):
                    name, index = str(index), index + 1
                    if name not in done:
                        yield ParquetRow(name, cells, shard_rows)


def _cells_reader(schema: pa.Schema, column: str) -> Callable[[pa.Array], Iterable[Cell]]:
    """How to get (bytes, path) pairs out of `column`; raises ValueError if it cannot."""
    if column not in schema.names:
        raise ValueError(f"no column {column!r} (columns: {', '.join(schema.names)})")
    column_type = schema.field(column).type
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return lambda values: ((data, None) for data in values.to_pylist())
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") != -1:

        def struct_cells(values: pa.Array) -> Iterable[Cell]:
            for value in values.to_pylist():
                value = value or {}
                yield value.get("bytes"), value.get("path")

        return struct_cells
    raise ValueError(f"column {column!r} has type {column_type}; expected binary or a struct with 'bytes'")


def resumable(
    read: Callable[[set[str]], Iterator[tuple[str, T]]], source: str, retry: Retry, done: Iterable[str] = ()
) -> Iterator[tuple[str, T]]:
    """The (name, row) pairs that `read(names to pass over)` gives; after a transient storage error it is called again
    with the names already given (and `done`), until `retry`'s budget runs out. Each row renews the budget. Raises the
    error that ends it (a permanent one, or `StorageUnavailable`) after the rows read before it."""
    given = set(done)
    deadline, attempt = retry.deadline(), 0
    while True:
        try:
            for name, row in read(given):
                given.add(name)
                deadline, attempt = retry.deadline(), 0
                yield name, row
            return
        except Exception as error:
            retry.wait(error, attempt, deadline, source)
            attempt += 1


def shard_image_names(source: str, kind: str, image_column: str, storage_options: dict[str, Any]) -> set[str]:
    """Member names (tar) or row indices (Parquet) of a shard's images, from tar headers or the Parquet footer."""
    fs, path = fsspec.core.url_to_fs(source, **storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            parquet = pq.ParquetFile(handle)
            _cells_reader(parquet.schema_arrow, image_column)
            return {str(index) for index in range(parquet.metadata.num_rows)}
        with tarfile.open(fileobj=handle, mode="r:*") as tar:
            names = filter(None, map(_member_name, tar.getmembers()))
            return {name for name in names if is_image_field(_split_member(name)[1])}


def tables_of(
    rows: Iterable[dict[str, Any]], schema: pa.Schema, size_of: Callable[[dict[str, Any]], int]
) -> Iterator[pa.Table]:
    """`rows` as tables of at most 256 rows, fewer once their `size_of` reaches 64 MiB: the output of a read task."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += size_of(row)
        if size >= _FLUSH_BYTES or len(batch) >= _FLUSH_ROWS:
            yield pa.Table.from_pylist(batch, schema=schema)
            batch, size = [], 0
    if batch:
        yield pa.Table.from_pylist(batch, schema=schema)


# --- the job's read stage (Ray tasks) ---------------------------------------------------------


def read_inputs(
    shards: list[ray.ObjectRef],
    loose: list[ray.ObjectRef],
    *,
    image_column: str,
    storage_options: dict[str, Any],
    retry: Retry,
    num_cpus: float = 0.25,
) -> ray.data.Dataset:
    """A lazy dataset of `READ_SCHEMA` rows, one per image of the work items (`pipeline.labelling.plan.WORK_SCHEMA`):
    `shards` and `loose` are tables of them in the object store (shards, and loose files), as the plan leaves them.

    Bytes are read by Ray tasks using `num_cpus` each: a shard per task, loose files 64 to a task (blocks cut as they
    stream from the tables). Skipped tar members and Parquet rows are passed over inside the task. Storage errors
    are retried by `retry`; past its budget the image (or the rest of the shard) becomes an error row.
    """
    parts = [
        ray.data.from_arrow_refs(refs).repartition(target_num_rows_per_block=rows)
        for refs, rows in ((shards, 1), (loose, _IMAGES_PER_BLOCK))
        if refs
    ]
    if not parts:
        return ray.data.from_arrow(READ_SCHEMA.empty_table())
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).map_batches(
        _read_items,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        fn_kwargs={"image_column": image_column, "storage_options": storage_options, "retry": retry},
    )


def _read_items(
    items: pa.Table, *, image_column: str, storage_options: dict[str, Any], retry: Retry
) -> Iterator[pa.Table]:
    """Ray task body: the rows of a block of work items, as tables of bounded size.

    The loose files of a block are fetched concurrently (`_FETCH_THREADS`), their rows kept in order; a shard
    streams its rows from this thread.
    """

    def rows_of(item: dict[str, Any]) -> Iterable[dict[str, Any]]:
        if item["kind"] == "images":
            return [_read_image(item, storage_options, retry)]
        return _read_shard(item, image_column, storage_options, retry)

    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        rows = (row for item_rows in pool.map(rows_of, items.to_pylist()) for row in item_rows)
        yield from tables_of(rows, READ_SCHEMA, lambda row: len(row["bytes"]))


def _read_image(item: dict[str, Any], storage_options: dict[str, Any], retry: Retry) -> dict[str, Any]:
    try:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        data = retry(lambda: fs.cat_file(path), item["source"])
    except Exception as error:
        return _row(item["key"], item["source"], error=_message(error))
    return _row(item["key"], item["source"], data)


def _read_shard(
    item: dict[str, Any], image_column: str, storage_options: dict[str, Any], retry: Retry
) -> Iterator[dict[str, Any]]:
    """Rows of one shard, passing over the work item's `skip`; one error row for a shard that fails for good."""
    key, source = item["key"], item["source"]
    skip = [member[len(key) + 1 :] for member in item["skip"]]
    images = _shard_images(source, item["kind"], image_column, storage_options, retry, skip)
    try:
        for name, (data, error, count) in images:
            yield _row(f"{key}/{name}", source, data, error, count)
    except Exception as final:
        yield _row(key, source, error=f"unreadable shard: {_message(final)}")


def _shard_images(
    source: str, kind: str, image_column: str, storage_options: dict[str, Any], retry: Retry, skip: Iterable[str] = ()
) -> ShardImages:
    """The images of a tar or Parquet shard, but those in `skip`, re-opened after transient errors."""
    images = _tar_images if kind == "webdataset" else partial(_parquet_images, image_column=image_column)

    def read(done: set[str]) -> ShardImages:
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
        return images(fs, path, done)

    return resumable(read, source, retry, skip)


def _tar_images(fs: fsspec.AbstractFileSystem, path: str, done: Container[str]) -> ShardImages:
    """Image members in archive order; the last one (held back until the end) carries the image count."""
    held: tuple[str, bytes] | None = None
    images = 0
    for member in tar_members(fs, path):
        if not is_image_field(member.field):
            continue
        images += 1
        if member.name in done:
            continue
        if held is not None:
            yield held[0], (held[1], None, 0)
        held = member.name, member.read()
    if held is not None:
        yield held[0], (held[1], None, images)


def _parquet_images(
    fs: fsspec.AbstractFileSystem, path: str, done: Container[str], *, image_column: str
) -> ShardImages:
    for row in parquet_rows(fs, path, [image_column], done):
        data, image_path = row.cells[0]
        if data is None:
            what = f"a path-only image ({image_path!r})" if image_path else "null"
            yield row.index, (None, f"{image_column} is {what}, not image bytes", row.shard_rows)
        else:
            yield row.index, (data, None, row.shard_rows)


# --- a few images, on the caller's process ----------------------------------------------------


def read_images(
    rows: list[dict[str, str]], *, image_column: str, storage_options: dict[str, Any], retry: Retry = Retry()
) -> dict[str, bytes]:
    """The encoded images of a few labelled rows (`key`, `source`), on the caller's process: loose files read whole,
    each tar or Parquet shard streamed once for the members it holds. A key that cannot be read is left out."""
    found: dict[str, bytes] = {}
    by_source: dict[str, list[str]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row["key"])
    for source, keys in by_source.items():
        try:
            for key, data in _images_of(source, keys, image_column, storage_options, retry):
                found[key] = data
        except Exception:  # noqa: BLE001 - a source gone since the run: its pictures are left out
            continue
    return found


def _images_of(
    source: str, keys: list[str], image_column: str, storage_options: dict[str, Any], retry: Retry
) -> Iterator[tuple[str, bytes]]:
    shard = re.match(SHARD_MEMBER_KEY, keys[0])
    if shard is None:
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
        yield keys[0], retry(lambda: fs.cat_file(path), source)
        return
    wanted = {key[shard.end() :]: key for key in keys}
    kind = "webdataset" if source.lower().endswith(TAR_SUFFIXES) else "parquet"
    for name, (data, _, _) in _shard_images(source, kind, image_column, storage_options, retry):
        if name in wanted and data is not None:
            yield wanted[name], data


# --- helpers ----------------------------------------------------------------------------------


def _row(
    key: str, source: str, data: bytes | None = None, error: str | None = None, shard_images: int = 0
) -> dict[str, Any]:
    return {"key": key, "source": source, "bytes": data or b"", "error": error, "shard_images": shard_images}


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
