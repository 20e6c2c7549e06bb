"""What a dataset holds: its files and shards listed on the driver with fsspec, and their keys.

Inputs (one URI or a list; each a folder/prefix read recursively, a glob, or a file):

- **images**: loose files with an image extension (jpg jpeg png bmp gif tif tiff webp, any case).
- **webdataset**: `.tar` (or `.tar.gz`/`.tgz`) shards of samples (see `pipeline.storage.formats`).
- **parquet**: `.parquet` shards, one sample a row.

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
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import has_magic

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"})
IMAGE_EXTENSION = rf"(?i)\.(?:{'|'.join(sorted(IMAGE_EXTENSIONS))})$"  # regex: a name's image extension
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LISTING_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # full URI
        pa.field("kind", pa.string(), nullable=False),  # "images" | "webdataset" | "parquet"
    ]
)
# `<shard key>/<member>`: the shard key is the longest prefix ending in a shard extension
SHARD_MEMBER_KEY = r"^(?P<shard>.+\.(?i:tar|tar\.gz|tgz|parquet))/"

_LIST_THREADS = 16
_LIST_CHUNK = 10_000  # names gathered into one Arrow chunk while listing


class InputError(ValueError):
    """The inputs cannot be listed: nothing found, or two inputs with the same key."""


class InputSpec(Protocol):
    """What listing needs of a dataset's description (`pipeline.config.InputConfig`, `LabelledSource`)."""

    @property
    def uris(self) -> tuple[str, ...]: ...

    format: str
    config_key: str  # the key the user set the URIs with, to name in errors (e.g. "input.uri", "data.uri")


def list_inputs(input_cfg: InputSpec, storage_options: dict[str, Any]) -> pa.Table:
    """The input files and shards as a `LISTING_SCHEMA` table sorted by key; reads no file contents.

    The URIs, and the top-level folders under each, are listed in parallel; names are kept as Arrow
    strings (about 100 bytes per file), never as one Python object per file, and the filesystem's
    listing cache is dropped after each URI.
    """
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        listed = list(
            pool.map(
                lambda uri: _list_uri(uri, input_cfg.format, storage_options, input_cfg.config_key), input_cfg.uris
            )
        )
    found = pa.concat_tables([table for _, table in listed])
    if found.num_rows == 0:
        raise InputError(
            f"{input_cfg.config_key}: no {wanted_kinds(input_cfg.format)} files found in {', '.join(input_cfg.uris)}"
        )
    base = _common_folder([root for root, _ in listed])
    keys = pc.utf8_ltrim(pc.utf8_slice_codeunits(found["path"], len(base)), "/")
    listing = pa.table([keys, found["source"], found["kind"]], schema=LISTING_SCHEMA).sort_by("key")
    del found, keys
    pa.default_memory_pool().release_unused()  # hand the copies made on the way back to the system
    check_unique(listing, input_cfg.config_key)
    return listing


def _list_uri(uri: str, wanted: str, storage_options: dict[str, Any], key: str) -> tuple[str, pa.Table]:
    """The root folder of one input URI and a table (path, source, kind) of the input files it names."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    try:
        root, paths = _expand(fs, path, uri, key)
    finally:
        fs.invalidate_cache()
    kinds = input_kinds(paths, wanted)
    if kinds.null_count:
        keep = pc.is_valid(kinds)
        paths, kinds = paths.filter(keep), kinds.filter(keep)
    sample = paths[0].as_py() if len(paths) else ""
    prefix = fs.unstrip_protocol(sample).removesuffix(sample)  # e.g. "s3://", "file://"
    sources = pc.binary_join_element_wise(prefix, paths, "")
    return root, pa.table({"path": paths, "source": sources, "kind": kinds})


def wanted_kinds(wanted: str) -> str:
    """What `format` takes, as errors name it."""
    return "image, .tar or .parquet" if wanted == "auto" else wanted


def input_kinds(paths: pa.Array, wanted: str) -> pa.Array:
    """Each path's input kind by its extension (any case); null for other and hidden files."""
    names = pc.utf8_lower(pc.struct_field(pc.extract_regex(paths, r"(?P<name>[^/]*)$"), [0]))
    rules = {
        "hidden": pc.starts_with(names, "."),
        "webdataset": pc.match_substring_regex(names, r"\.(tar|tar\.gz|tgz)$"),
        "parquet": pc.ends_with(names, ".parquet"),
        "images": pc.match_substring_regex(names, IMAGE_EXTENSION),
    }
    values = [None if kind == "hidden" or wanted not in ("auto", kind) else kind for kind in rules]
    conditions = pc.make_struct(*rules.values(), field_names=list(rules))
    return pc.case_when(conditions, *(pa.scalar(value, pa.string()) for value in values))


def _expand(fs: fsspec.AbstractFileSystem, path: str, uri: str, key: str) -> tuple[str, pa.Array]:
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
    raise InputError(f"{key}: {uri} does not exist")


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


def key_share(key: str, seed: int) -> float:
    """Where a key falls in [0, 1): a hash of seed and key, the same in every run (splits into train and val)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def _common_folder(folders: list[str]) -> str:
    parts = [folder.split("/") for folder in folders]
    common = []
    for level in zip(*parts):
        if any(part != level[0] for part in level):
            break
        common.append(level[0])
    return "/".join(common)


def check_unique(listing: pa.Table, key: str) -> None:
    """Refuse two rows of `listing` (sorted by key, so duplicates are neighbours) with one key; `key` names where
    the inputs came from."""
    keys = listing["key"].combine_chunks()
    same = pc.equal(keys[1:], keys[:-1]) if len(keys) > 1 else pa.array([], pa.bool_())
    duplicates = pc.indices_nonzero(same)
    if len(duplicates):
        first = duplicates[0].as_py()
        a, b = listing.slice(first, 2).to_pylist()
        raise InputError(
            f"{key}: {len(duplicates)} duplicate key(s), e.g. {a['key']!r} from {a['source']} and {b['source']}"
        )
