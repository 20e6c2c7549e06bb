"""Read stage: list the inputs on the driver with fsspec, read their bytes in Ray tasks.

Inputs (`input.uri`: one URI or a list; each a folder/prefix read recursively, a glob, or a file):

- **images**: loose files with an image extension (jpg jpeg png bmp gif tif tiff webp, any case);
  one row per file.
- **webdataset**: `.tar` (or `.tar.gz`/`.tgz`) shards. Following the WebDataset convention a member
  `dir/0001.seg.png` has the basename prefix `0001` and the field `seg.png`; the members whose field is
  exactly an image extension (`0001.jpg`, not `0001.seg.png`) are the images, one row each. Other
  members are ignored, and so are a repeated member name (the first copy is read) and names that
  leave the archive (`../x.jpg`).
- **parquet**: `.parquet` shards; `input.image_column` holds raw image bytes or the Hugging Face
  datasets image struct `{bytes, path}` (the bytes are used; a path-only image is an error row).

`format: auto` picks each file's kind by its extension; an explicit format takes only files of that
kind. Files whose name starts with "." are ignored everywhere.

Keys are stable across runs and unique, and are what resume matches on:

- every URI has a root folder: a folder is its own root, a glob's root is the folder before its first
  wildcard, a single file's root is the folder holding it;
- the key of a loose image is its path relative to the deepest folder holding all roots (for one URI,
  that is its root; for a list of files in one folder, their file names);
- the key of a tar member is `<shard key>/<member name>`, of a Parquet row `<shard key>/<row index>`
  (0-based within the file, also when the image column is the `{bytes, path}` struct: its path need
  not be unique).

Two inputs with the same key are an `InputError` at listing time.

Listing (`list_inputs`) gives a `LISTING_SCHEMA` table; `pending_inputs` turns it into the work
items (`WORK_SCHEMA`) of a run, given the keys already done; `read_inputs` reads them on Ray.

Rows have the columns of `READ_SCHEMA`: `key`, `source` (the full URI of the file or shard),
`bytes` (the encoded image; empty when the read failed), `error` (null, or why the read failed) and
`shard_images`: the number of images of the row's shard, set on (at least) the row of its last image
(every row of a Parquet shard), 0 where not known (loose files, the other rows of a tar shard). Rows
carry it into `labels/`, so that a later run knows a shard whose images are all done without opening it.
A file that cannot be read yields an error row, never an exception. A shard that cannot be opened,
or breaks part-way (a corrupt tar, a Parquet file without the image column), yields one error row
keyed by the shard's own key, after the rows read before the break. Transient storage errors are
retried (`pipeline.storage.Retry`, within `storage.retry_s`); a shard re-opened after one continues after the
rows it already gave.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from fsspec.core import has_magic

from pipeline.storage import Retry

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

READ_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("shard_images", pa.int64(), nullable=False),
    ]
)
LISTING_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # full URI
        pa.field("kind", pa.string(), nullable=False),  # "images" | "webdataset" | "parquet"
    ]
)
WORK_SCHEMA = pa.schema([*LISTING_SCHEMA, pa.field("skip", pa.list_(pa.string()))])  # skip: done member keys
# `<shard key>/<member>`: the shard key is the longest prefix ending in a shard extension
_SHARD_MEMBER = r"^(?P<shard>.+\.(?i:tar|tar\.gz|tgz|parquet))/"

_IMAGES_PER_BLOCK = 64  # loose files read by one task ...
_FETCH_THREADS = 16  # ... this many at a time
_FLUSH_ROWS = 256  # rows per output table of a read task ...
_FLUSH_BYTES = 64 << 20  # ... or fewer, once their bytes reach this
_PARQUET_BATCH_ROWS = 64
_COUNT_THREADS = 16
_LIST_THREADS = 16
_LIST_CHUNK = 10_000  # names gathered into one Arrow chunk while listing


class InputError(ValueError):
    """The inputs cannot be listed: nothing found, or two inputs with the same key."""


class InputSpec(Protocol):
    """What the read stage needs of the config's `input` section (`pipeline.config.InputConfig`)."""

    @property
    def uris(self) -> tuple[str, ...]: ...

    format: str
    image_column: str


@dataclass(frozen=True)
class InputCount:
    """What `count_inputs` finds: listed files, images a full run would label, and how many to skip."""

    files: int
    images: int
    skipped: int


# --- listing (driver) -------------------------------------------------------------------------


def list_inputs(input_cfg: InputSpec, storage_options: dict[str, Any]) -> pa.Table:
    """The input files and shards as a `LISTING_SCHEMA` table sorted by key; reads no file contents.

    The URIs, and the top-level folders under each, are listed in parallel; names are kept as Arrow
    strings (about 100 bytes per file), never as one Python object per file, and the filesystem's
    listing cache is dropped after each URI.
    """
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        listed = list(pool.map(lambda uri: _list_uri(uri, input_cfg.format, storage_options), input_cfg.uris))
    found = pa.concat_tables([table for _, table in listed])
    if found.num_rows == 0:
        wanted = "image, .tar or .parquet" if input_cfg.format == "auto" else input_cfg.format
        raise InputError(f"input.uri: no {wanted} files found in {', '.join(input_cfg.uris)}")
    base = _common_folder([root for root, _ in listed])
    keys = pc.utf8_ltrim(pc.utf8_slice_codeunits(found["path"], len(base)), "/")
    listing = pa.table([keys, found["source"], found["kind"]], schema=LISTING_SCHEMA).sort_by("key")
    del found, keys
    pa.default_memory_pool().release_unused()  # hand the copies made on the way back to the system
    _check_unique(listing)
    return listing


def _list_uri(uri: str, wanted: str, storage_options: dict[str, Any]) -> tuple[str, pa.Table]:
    """The root folder of one input URI and a table (path, source, kind) of the input files it names."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    try:
        root, paths = _expand(fs, path, uri)
    finally:
        fs.invalidate_cache()
    kinds = _kinds(paths, wanted)
    if kinds.null_count:
        keep = pc.is_valid(kinds)
        paths, kinds = paths.filter(keep), kinds.filter(keep)
    sample = paths[0].as_py() if len(paths) else ""
    prefix = fs.unstrip_protocol(sample).removesuffix(sample)  # e.g. "s3://", "file://"
    sources = pc.binary_join_element_wise(prefix, paths, "")
    return root, pa.table({"path": paths, "source": sources, "kind": kinds})


def _kinds(paths: pa.Array, wanted: str) -> pa.Array:
    """Each path's input kind by its extension (any case); null for other and hidden files."""
    names = pc.utf8_lower(pc.struct_field(pc.extract_regex(paths, r"(?P<name>[^/]*)$"), [0]))
    rules = {
        "hidden": pc.starts_with(names, "."),
        "webdataset": pc.match_substring_regex(names, r"\.(tar|tar\.gz|tgz)$"),
        "parquet": pc.ends_with(names, ".parquet"),
        "images": pc.match_substring_regex(names, rf"\.({'|'.join(sorted(IMAGE_EXTENSIONS))})$"),
    }
    values = [None if kind == "hidden" or wanted not in ("auto", kind) else kind for kind in rules]
    conditions = pc.make_struct(*rules.values(), field_names=list(rules))
    return pc.case_when(conditions, *(pa.scalar(value, pa.string()) for value in values))


def _expand(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[str, pa.Array]:
    """The root folder of one input URI and the paths of the files it names."""
    if has_magic(path):
        wildcard = min(path.index(char) for char in "*?[" if char in path)
        root = path[:wildcard].rpartition("/")[0]
        matches = fs.glob(path, detail=True)
        files = pa.array(sorted(name for name, info in matches.items() if info["type"] != "directory"), pa.string())
        folders = [_files_under(fs, name) for name, info in sorted(matches.items()) if info["type"] == "directory"]
        return root, pa.concat_arrays([files, *folders])
    if fs.isdir(path):
        return path, _files_under(fs, path)
    if fs.isfile(path):
        return path.rpartition("/")[0], pa.array([path], pa.string())
    raise InputError(f"input.uri: {uri} does not exist")


def _files_under(fs: fsspec.AbstractFileSystem, folder: str) -> pa.Array:
    """Every file below `folder`: its own files, and each top-level subfolder walked in its own thread."""
    entries = fs.ls(folder, detail=True)
    files = pa.array([entry["name"] for entry in entries if entry["type"] != "directory"], pa.string())
    subfolders = [entry["name"] for entry in entries if entry["type"] == "directory"]
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        return pa.concat_arrays([files, *pool.map(lambda sub: _walk(fs, sub), subfolders)])


def _walk(fs: fsspec.AbstractFileSystem, folder: str) -> pa.Array:
    """Every file below `folder`, gathered page by page (S3) or folder by folder into Arrow chunks."""
    if "s3" in fs.protocol:  # s3fs: one flat paged listing, without filling its listing cache
        bucket, key, _ = fs.split_path(folder)

        async def pages() -> list[pa.Array]:
            chunks, names = [], []
            async for info in fs._iterdir(bucket, prefix=f"{key.rstrip('/')}/", delimiter=""):
                names.append(info["name"])
                if len(names) == _LIST_CHUNK:
                    chunks.append(pa.array(names, pa.string()))
                    names = []
            return [*chunks, pa.array(names, pa.string())]

        return pa.concat_arrays(fsspec.asyn.sync(fs.loop, pages))
    chunks = [
        pa.array([f"{folder_path}/{name}" for name in names], pa.string())
        for folder_path, _, names in fs.walk(folder, detail=False)
    ]
    return pa.concat_arrays([pa.array([], pa.string()), *chunks])


def _common_folder(folders: list[str]) -> str:
    parts = [folder.split("/") for folder in folders]
    common = []
    for level in zip(*parts):
        if any(part != level[0] for part in level):
            break
        common.append(level[0])
    return "/".join(common)


def _check_unique(listing: pa.Table) -> None:
    """`listing` is sorted by key, so duplicates are neighbours."""
    keys = listing["key"].combine_chunks()
    same = pc.equal(keys[1:], keys[:-1]) if len(keys) > 1 else pa.array([], pa.bool_())
    duplicates = pc.indices_nonzero(same)
    if len(duplicates):
        first = duplicates[0].as_py()
        a, b = listing.slice(first, 2).to_pylist()
        raise InputError(
            f"input.uri: {len(duplicates)} duplicate key(s), e.g. {a['key']!r} from {a['source']} and {b['source']}"
        )


# --- what to read (driver) --------------------------------------------------------------------


def shard_of(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The shard key of each key `<shard>/<member>` of a tar member or Parquet row; null for other keys."""
    return pc.struct_field(pc.extract_regex(keys, _SHARD_MEMBER), [0])


def pending_inputs(listing: pa.Table, done: pa.Array, shard_images: pa.Table | None = None) -> pa.Table:
    """The work items (`WORK_SCHEMA`) of the listed inputs whose images are not all in `done`.

    `done` holds the keys not to label again. A loose file in it is dropped; a shard gets the keys of
    its done members as `skip`, and is dropped when they are all its images: `shard_images` (columns
    `shard`, `images`, from earlier runs' rows) says how many images a shard has.
    """
    done = done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done
    loose = pc.equal(listing["kind"], "images")
    todo_loose = listing.filter(pc.and_(loose, pc.invert(pc.is_in(listing["key"], value_set=done))))
    shards = listing.filter(pc.invert(loose))
    shard_keys = shard_of(done)
    done_members = pa.table({"shard": shard_keys, "member": done}).filter(pc.is_valid(shard_keys))
    per_shard = done_members.group_by("shard").aggregate([("member", "list"), ("member", "count")])
    members = pc.index_in(shards["key"], value_set=per_shard["shard"])
    skip = pc.fill_null(per_shard["member_list"].take(members), pa.scalar([], pa.list_(pa.string())))
    if shard_images is None:
        shard_images = pa.table({"shard": pa.array([], pa.string()), "images": pa.array([], pa.int64())})
    images = shard_images["images"].take(pc.index_in(shards["key"], value_set=shard_images["shard"]))
    complete = pc.fill_null(pc.greater_equal(per_shard["member_count"].take(members), images), False)
    shards, skip = shards.filter(pc.invert(complete)), skip.filter(pc.invert(complete))
    work_shards = pa.table([shards["key"], shards["source"], shards["kind"], skip], schema=WORK_SCHEMA)
    empty_skip = pa.ListArray.from_arrays(np.zeros(todo_loose.num_rows + 1, np.int32), pa.array([], pa.string()))
    work_loose = pa.table([*todo_loose.columns, empty_skip], schema=WORK_SCHEMA)
    return pa.concat_tables([work_shards.sort_by("key"), work_loose])


# --- counting (driver, for --dry-run) ---------------------------------------------------------


def count_inputs(
    listing: pa.Table,
    image_column: str,
    storage_options: dict[str, Any],
    *,
    retry: Retry,
    done: pa.Array | None = None,
) -> InputCount:
    """Count the images without reading them: tar headers only, Parquet row counts from the footer.

    A shard that cannot be read counts as one image: a run turns it into one error row.
    """
    done = pa.array([], pa.string()) if done is None else done
    loose = listing.filter(pc.equal(listing["kind"], "images"))
    shards = listing.filter(pc.not_equal(listing["kind"], "images")).to_pylist()
    done_members = set(done.filter(pc.is_valid(shard_of(done))).to_pylist())

    def count_shard(file: dict[str, str]) -> tuple[int, int]:
        try:
            members = retry(lambda: _shard_members(file, storage_options, image_column), file["source"])
        except Exception:
            return 1, 0
        return len(members), sum(f"{file['key']}/{name}" in done_members for name in members)

    with ThreadPoolExecutor(_COUNT_THREADS) as pool:
        shard_counts = list(pool.map(count_shard, shards))
    return InputCount(
        files=listing.num_rows,
        images=loose.num_rows + sum(images for images, _ in shard_counts),
        skipped=(pc.sum(pc.is_in(loose["key"], value_set=done)).as_py() or 0) + sum(n for _, n in shard_counts),
    )


def _shard_members(file: dict[str, str], storage_options: dict[str, Any], image_column: str) -> set[str]:
    """Member names (tar) or row indices (Parquet) of a shard's images, from headers/metadata."""
    fs, path = fsspec.core.url_to_fs(file["source"], **storage_options)
    with fs.open(path, "rb") as handle:
        if file["kind"] == "parquet":
            parquet = pq.ParquetFile(handle)
            _image_values_reader(parquet.schema_arrow, image_column)
            return {str(index) for index in range(parquet.metadata.num_rows)}
        with tarfile.open(fileobj=handle, mode="r:*") as tar:
            return {name for name in map(_image_member_name, tar.getmembers()) if name is not None}


# --- reading (Ray tasks) ----------------------------------------------------------------------


def read_inputs(
    work: pa.Table, *, image_column: str, storage_options: dict[str, Any], retry: Retry, num_cpus: float = 0.25
) -> ray.data.Dataset:
    """A lazy dataset of `READ_SCHEMA` rows, one per image of the work items (see `pending_inputs`).

    Bytes are read by Ray tasks using `num_cpus` each: a shard per task, loose files 64 to a task.
    Skipped tar members and Parquet rows are passed over inside the task (a Parquet row group that is
    skipped entirely is not read at all). Storage errors are retried by `retry`; past its budget the image (or the
    rest of the shard) becomes an error row.
    """
    if work.num_rows == 0:
        return ray.data.from_arrow(READ_SCHEMA.empty_table())
    shards = pc.sum(pc.not_equal(work["kind"], "images")).as_py()
    blocks = [work.slice(i, 1) for i in range(shards)]
    blocks += [work.slice(start, _IMAGES_PER_BLOCK) for start in range(shards, work.num_rows, _IMAGES_PER_BLOCK)]
    return ray.data.from_arrow(blocks).map_batches(
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
        members = _tar_members if item["kind"] == "webdataset" else _parquet_rows
        return _read_shard(item, members, image_column, storage_options, retry)

    rows: list[dict[str, Any]] = []
    size = 0
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for item_rows in pool.map(rows_of, items.to_pylist()):
            for row in item_rows:
                rows.append(row)
                size += len(row["bytes"])
                if size >= _FLUSH_BYTES or len(rows) >= _FLUSH_ROWS:
                    yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
                    rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _read_image(item: dict[str, Any], storage_options: dict[str, Any], retry: Retry) -> dict[str, Any]:
    try:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        data = retry(lambda: fs.cat_file(path), item["source"])
    except Exception as error:
        return _row(item["key"], item["source"], error=_message(error))
    return _row(item["key"], item["source"], data)


def read_images(rows: list[dict[str, str]], *, image_column: str, storage_options: dict[str, Any]) -> dict[str, bytes]:
    """The encoded images of a few labelled rows (`key`, `source`), on the caller's process: loose files read whole,
    each tar or Parquet shard streamed once for the members it holds. A key that cannot be read is left out."""
    found: dict[str, bytes] = {}
    by_source: dict[str, list[str]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row["key"])
    for source, keys in by_source.items():
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
        shard = re.match(_SHARD_MEMBER, keys[0])
        try:
            if shard is None:
                found[keys[0]] = fs.cat_file(path)
                continue
            members = _tar_members if source.lower().endswith(TAR_SUFFIXES) else _parquet_rows
            wanted = {key[shard.end() :]: key for key in keys}
            for name, data, _, _ in members(fs, path, image_column, set()):
                if name in wanted and data is not None:
                    found[wanted[name]] = data
        except Exception:  # noqa: BLE001 - a source gone since the run: its pictures are left out
            continue
    return found


# A shard's image rows: (member name or row index, bytes or None, error or None, shard_images)
MemberRows = Iterator[tuple[str, bytes | None, str | None, int]]
# (fs, path, image column, names to pass over) -> the shard's rows
MemberReader = Callable[[fsspec.AbstractFileSystem, str, str, set[str]], MemberRows]


def _read_shard(
    item: dict[str, Any], members: MemberReader, image_column: str, storage_options: dict[str, Any], retry: Retry
) -> Iterator[dict[str, Any]]:
    """Rows of one shard; after a transient error the shard is re-opened and passes over `done`. Each row read
    renews the retry budget."""
    key, source = item["key"], item["source"]
    done = {member[len(key) + 1 :] for member in item["skip"]}
    deadline, attempt = retry.deadline(), 0
    while True:
        try:
            fs, path = fsspec.core.url_to_fs(source, **storage_options)
            for name, data, error, images in members(fs, path, image_column, done):
                done.add(name)
                deadline, attempt = retry.deadline(), 0
                yield _row(f"{key}/{name}", source, data, error, images)
            return
        except Exception as error:
            try:
                retry.wait(error, attempt, deadline, source)
            except Exception as final:
                yield _row(key, source, error=f"unreadable shard: {_message(final)}")
                return
            attempt += 1


def _tar_members(
    fs: fsspec.AbstractFileSystem, path: str, image_column: str, done: set[str]
) -> MemberRows:
    """Image members in archive order; the last one (held back until the end) carries the image count."""
    seen: set[str] = set()
    held: tuple[str, bytes] | None = None
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            name = _image_member_name(info)
            if name is None or name in seen:
                continue
            seen.add(name)
            if name in done:
                continue
            if held is not None:
                yield *held, None, 0
            held = name, tar.extractfile(info).read()
    if held is not None:
        yield *held, None, len(seen)


def _image_member_name(info: tarfile.TarInfo) -> str | None:
    """The normalised name of an image member (WebDataset field is an image extension), else None."""
    if not info.isfile():
        return None
    name = posixpath.normpath(info.name).lstrip("/")
    if name == ".." or name.startswith("../"):
        return None
    _, dot, field = name.rpartition("/")[2].partition(".")
    return name if dot and field.lower() in IMAGE_EXTENSIONS else None


def _parquet_rows(
    fs: fsspec.AbstractFileSystem, path: str, image_column: str, done: set[str]
) -> MemberRows:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        values_of = _image_values_reader(parquet.schema_arrow, image_column)
        images = parquet.metadata.num_rows
        start = 0
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            indices = range(start, start + count)
            start += count
            if all(str(index) in done for index in indices):
                continue
            index = indices.start
            batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=[image_column])
            for batch in batches:
                for data, image_path in values_of(batch.column(0)):
                    name = str(index)
                    index += 1
                    if name in done:
                        continue
                    if data is None:
                        what = f"a path-only image ({image_path!r})" if image_path else "null"
                        yield name, None, f"{image_column} is {what}, not image bytes", images
                    else:
                        yield name, data, None, images


def _image_values_reader(
    schema: pa.Schema, image_column: str
) -> Callable[[pa.Array], Iterable[tuple[bytes | None, str | None]]]:
    """How to get (bytes, path) pairs out of the image column; raises ValueError if it cannot."""
    if image_column not in schema.names:
        raise ValueError(f"no column {image_column!r} (columns: {', '.join(schema.names)})")
    column_type = schema.field(image_column).type
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return lambda values: ((data, None) for data in values.to_pylist())
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") != -1:

        def struct_values(values: pa.Array) -> Iterable[tuple[bytes | None, str | None]]:
            for value in values.to_pylist():
                value = value or {}
                yield value.get("bytes"), value.get("path")

        return struct_values
    raise ValueError(
        f"column {image_column!r} has type {column_type}; expected binary or a struct with 'bytes'"
    )


# --- helpers ----------------------------------------------------------------------------------


def _row(
    key: str, source: str, data: bytes | None = None, error: str | None = None, shard_images: int = 0
) -> dict[str, Any]:
    return {"key": key, "source": source, "bytes": data or b"", "error": error, "shard_images": shard_images}


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
