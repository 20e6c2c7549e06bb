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

Rows have the columns of `READ_SCHEMA`: `key`, `source` (the full URI of the file or shard),
`bytes` (the encoded image; empty when the read failed) and `error` (null, or why the read failed).
A file that cannot be read yields an error row, never an exception. A shard that cannot be opened,
or breaks part-way (a corrupt tar, a Parquet file without the image column), yields one error row
keyed by the shard's own key, after the rows read before the break. Transient storage errors are
retried with back-off; a shard re-opened after one continues after the rows it already gave.
"""

from __future__ import annotations

import math
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from fsspec.core import has_magic

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

READ_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

_IMAGES_PER_BLOCK = 64  # loose files read by one task
_FLUSH_ROWS = 256  # rows per output table of a read task ...
_FLUSH_BYTES = 64 << 20  # ... or fewer, once their bytes reach this
_PARQUET_BATCH_ROWS = 64
_TRIES = 4
_RETRY_DELAY_S = 0.25
_COUNT_THREADS = 16
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class InputError(ValueError):
    """The inputs cannot be listed: nothing found, or two inputs with the same key."""


class InputSpec(Protocol):
    """What the read stage needs of the config's `input` section (`pipeline.config.InputConfig`)."""

    @property
    def uris(self) -> tuple[str, ...]: ...

    format: str
    image_column: str


@dataclass(frozen=True)
class InputFile:
    """One listed file: a loose image (`key` is the image's key) or a shard (`key` is the shard's)."""

    key: str
    source: str
    kind: str  # "images" | "webdataset" | "parquet"


@dataclass(frozen=True)
class InputCount:
    """What `count_inputs` finds: listed files, images a full run would label, and how many to skip."""

    files: int
    images: int
    skipped: int


# --- listing (driver) -------------------------------------------------------------------------


def list_inputs(input_cfg: InputSpec, storage_options: dict[str, Any]) -> list[InputFile]:
    """List the input files and shards with their keys, sorted by key; reads no file contents."""
    roots: list[str] = []
    found: list[tuple[str, str, str]] = []  # (path, source, kind)
    for uri in input_cfg.uris:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        fs.invalidate_cache()
        root, paths = _expand(fs, path, uri)
        roots.append(root)
        for file_path in paths:
            kind = _kind(file_path, input_cfg.format)
            if kind is not None:
                found.append((file_path, fs.unstrip_protocol(file_path), kind))
    if not found:
        wanted = "image, .tar or .parquet" if input_cfg.format == "auto" else input_cfg.format
        raise InputError(f"input.uri: no {wanted} files found in {', '.join(input_cfg.uris)}")
    base = _common_folder(roots)
    files = sorted(
        (InputFile(path[len(base) :].lstrip("/"), source, kind) for path, source, kind in found),
        key=lambda file: file.key,
    )
    _check_unique(files)
    return files


def _expand(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[str, list[str]]:
    """The root folder of one input URI and the files it names."""
    if has_magic(path):
        wildcard = min(path.index(char) for char in "*?[" if char in path)
        root = path[:wildcard].rpartition("/")[0]
        paths = []
        for match, info in sorted(fs.glob(path, detail=True).items()):
            paths.extend(fs.find(match) if info["type"] == "directory" else [match])
        return root, paths
    if fs.isdir(path):
        return path, fs.find(path)
    if fs.isfile(path):
        return path.rpartition("/")[0], [path]
    raise InputError(f"input.uri: {uri} does not exist")


def _kind(path: str, wanted: str) -> str | None:
    name = path.rpartition("/")[2].lower()
    if name.startswith("."):
        return None
    if name.endswith(TAR_SUFFIXES):
        kind = "webdataset"
    elif name.endswith(".parquet"):
        kind = "parquet"
    elif "." in name and name.rpartition(".")[2] in IMAGE_EXTENSIONS:
        kind = "images"
    else:
        return None
    return kind if wanted in ("auto", kind) else None


def _common_folder(folders: list[str]) -> str:
    parts = [folder.split("/") for folder in folders]
    common = []
    for level in zip(*parts):
        if any(part != level[0] for part in level):
            break
        common.append(level[0])
    return "/".join(common)


def _check_unique(files: list[InputFile]) -> None:
    """`files` is sorted by key, so duplicates are neighbours."""
    duplicates = [(a, b) for a, b in zip(files, files[1:]) if a.key == b.key]
    if duplicates:
        a, b = duplicates[0]
        raise InputError(
            f"input.uri: {len(duplicates)} duplicate key(s), e.g. {a.key!r} from {a.source} and {b.source}"
        )


def _skips_by_shard(files: list[InputFile], skip_keys: Iterable[str]) -> dict[str, set[str]]:
    """Split the skip keys that fall inside shards into {shard key: {member name or row index}}."""
    skips: dict[str, set[str]] = {file.key: set() for file in files if file.kind != "images"}
    if not skips:
        return skips
    for key in skip_keys:
        slash = key.find("/")
        while slash != -1:
            if key[:slash] in skips:
                skips[key[:slash]].add(key[slash + 1 :])
                break
            slash = key.find("/", slash + 1)
    return skips


# --- counting (driver, for --dry-run) ---------------------------------------------------------


def count_inputs(
    input_cfg: InputSpec, storage_options: dict[str, Any], *, skip_keys: Iterable[str] = frozenset()
) -> InputCount:
    """Count the images without reading them: tar headers only, Parquet row counts from the footer.

    A shard that cannot be read counts as one image: a run turns it into one error row.
    """
    skip_keys = set(skip_keys)
    files = list_inputs(input_cfg, storage_options)
    skips = _skips_by_shard(files, skip_keys)
    loose = [file for file in files if file.kind == "images"]
    shards = [file for file in files if file.kind != "images"]

    def count_shard(file: InputFile) -> tuple[int, int]:
        try:
            members = _with_retries(lambda: _shard_members(file, storage_options, input_cfg.image_column))
        except Exception:
            return 1, 0
        return len(members), len(members & skips[file.key])

    with ThreadPoolExecutor(_COUNT_THREADS) as pool:
        shard_counts = list(pool.map(count_shard, shards))
    return InputCount(
        files=len(files),
        images=len(loose) + sum(images for images, _ in shard_counts),
        skipped=sum(file.key in skip_keys for file in loose) + sum(skipped for _, skipped in shard_counts),
    )


def _shard_members(file: InputFile, storage_options: dict[str, Any], image_column: str) -> set[str]:
    """Member names (tar) or row indices (Parquet) of a shard's images, from headers/metadata."""
    fs, path = fsspec.core.url_to_fs(file.source, **storage_options)
    with fs.open(path, "rb") as handle:
        if file.kind == "parquet":
            parquet = pq.ParquetFile(handle)
            _image_values_reader(parquet.schema_arrow, image_column)
            return {str(index) for index in range(parquet.metadata.num_rows)}
        with tarfile.open(fileobj=handle, mode="r:*") as tar:
            return {name for name in map(_image_member_name, tar.getmembers()) if name is not None}


# --- reading (Ray tasks) ----------------------------------------------------------------------


def read_inputs(
    input_cfg: InputSpec,
    storage_options: dict[str, Any],
    *,
    skip_keys: Iterable[str] = frozenset(),
    num_cpus: float = 0.5,
) -> ray.data.Dataset:
    """A lazy dataset of `READ_SCHEMA` rows, one per input image not in `skip_keys`.

    Listing runs here, on the driver; bytes are read by Ray tasks using `num_cpus` each. Loose files
    in `skip_keys` are dropped before any task runs; skipped tar members and Parquet rows are passed
    over inside the task (a Parquet row group that is skipped entirely is not read at all).
    """
    skip_keys = set(skip_keys)
    files = list_inputs(input_cfg, storage_options)
    skips = _skips_by_shard(files, skip_keys)
    items = [
        {"kind": file.kind, "key": file.key, "source": file.source, "skip": sorted(skips.get(file.key, ()))}
        for file in sorted(files, key=lambda file: file.kind == "images")  # shards first: own blocks
        if file.kind != "images" or file.key not in skip_keys
    ]
    if not items:
        return ray.data.from_arrow(READ_SCHEMA.empty_table())
    loose = sum(item["kind"] == "images" for item in items)
    blocks = (len(items) - loose) + math.ceil(loose / _IMAGES_PER_BLOCK)
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _read_items,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        fn_kwargs={"image_column": input_cfg.image_column, "storage_options": storage_options},
    )


def _read_items(items: pa.Table, *, image_column: str, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """Ray task body: the rows of a block of work items, as tables of bounded size."""
    rows: list[dict[str, Any]] = []
    size = 0
    for item in items.to_pylist():
        if item["kind"] == "images":
            item_rows = _read_image(item, storage_options)
        else:
            members = _tar_members if item["kind"] == "webdataset" else _parquet_rows
            item_rows = _read_shard(item, members, image_column, storage_options)
        for row in item_rows:
            rows.append(row)
            size += len(row["bytes"])
            if size >= _FLUSH_BYTES or len(rows) >= _FLUSH_ROWS:
                yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
                rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _read_image(item: dict[str, Any], storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        data = _with_retries(lambda: fs.cat_file(path))
    except Exception as error:
        yield _row(item["key"], item["source"], error=_message(error))
        return
    yield _row(item["key"], item["source"], data)


# A shard's image rows: (member name or row index, bytes or None, error or None)
MemberRows = Iterator[tuple[str, bytes | None, str | None]]
# (fs, path, image column, names to pass over) -> the shard's rows
MemberReader = Callable[[fsspec.AbstractFileSystem, str, str, set[str]], MemberRows]


def _read_shard(
    item: dict[str, Any], members: MemberReader, image_column: str, storage_options: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Rows of one shard; after a transient error the shard is re-opened and passes over `done`."""
    key, source = item["key"], item["source"]
    done = set(item["skip"])
    for attempt in range(_TRIES):
        try:
            fs, path = fsspec.core.url_to_fs(source, **storage_options)
            for name, data, error in members(fs, path, image_column, done):
                done.add(name)
                yield _row(f"{key}/{name}", source, data, error)
            return
        except Exception as error:
            if attempt + 1 == _TRIES or not _is_transient(error):
                yield _row(key, source, error=f"unreadable shard: {_message(error)}")
                return
            time.sleep(_RETRY_DELAY_S * 2**attempt)


def _tar_members(
    fs: fsspec.AbstractFileSystem, path: str, image_column: str, done: set[str]
) -> MemberRows:
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            name = _image_member_name(info)
            if name is not None and name not in done:
                yield name, tar.extractfile(info).read(), None


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
                        yield name, None, f"{image_column} is {what}, not image bytes"
                    else:
                        yield name, data, None


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


def _row(key: str, source: str, data: bytes | None = None, error: str | None = None) -> dict[str, Any]:
    return {"key": key, "source": source, "bytes": data or b"", "error": error}


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, _PERMANENT_ERRORS)


def _with_retries(action: Callable[[], Any]) -> Any:
    """Run `action`, retrying transient storage errors with exponential back-off."""
    for attempt in range(_TRIES):
        try:
            return action()
        except Exception as error:
            if attempt + 1 == _TRIES or not _is_transient(error):
                raise
            time.sleep(_RETRY_DELAY_S * 2**attempt)
