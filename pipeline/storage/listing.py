"""What a dataset holds: its files and shards listed with fsspec, and their keys. `list_inputs` lists on the driver
(the datasets of training, prompts and evaluation); the job lists its `listing_pieces` in Ray tasks.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ListingPiece:
    """A part of a listing that one thread or Ray task makes (`list_piece`): files of one input URI found already, and
    folders below it to walk."""

    uri: str  # the input URI (its filesystem)
    files: tuple[str, ...]
    folders: tuple[str, ...]
    base: str  # keys are paths relative to it
    wanted: str  # the `format`


def list_inputs(input_cfg: InputSpec, storage_options: dict[str, Any]) -> pa.Table:
    """The input files and shards as a `LISTING_SCHEMA` table sorted by key; reads no file contents.

    The URIs, and the top-level folders under each, are listed in parallel (`listing_pieces`); names are kept as
    Arrow strings (about 100 bytes per file), never as one Python object per file, and the filesystem's listing
    cache is dropped after each folder.
    """
    pieces = listing_pieces(input_cfg, storage_options, folders_per_piece=1)
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        found = pa.concat_tables(
            [LISTING_SCHEMA.empty_table(), *pool.map(lambda piece: list_piece(piece, storage_options), pieces)]
        )
    if found.num_rows == 0:
        raise InputError(nothing_found(input_cfg))
    listing = found.sort_by("key")
    del found
    pa.default_memory_pool().release_unused()  # hand the copies made on the way back to the system
    check_unique(listing, input_cfg.config_key)
    return listing


def nothing_found(input_cfg: InputSpec) -> str:
    """The error of a listing that found no inputs."""
    return f"{input_cfg.config_key}: no {wanted_kinds(input_cfg.format)} files found in {', '.join(input_cfg.uris)}"


def listing_pieces(input_cfg: InputSpec, storage_options: dict[str, Any], folders_per_piece: int) -> list[ListingPiece]:
    """The pieces of the listing of `input_cfg`'s URIs: for each URI its top level (a glob's matches, a folder's
    files and subfolders, or a file), its folders `folders_per_piece` to a piece. Raises `InputError` for a URI that
    does not exist."""
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        tops = list(pool.map(lambda uri: _top_level(uri, storage_options, input_cfg.config_key), input_cfg.uris))
    base = _common_folder([root for _, root, _, _ in tops])
    pieces = []
    for uri, _, files, folders in tops:
        pieces += [ListingPiece(uri, files, (), base, input_cfg.format)] if files else []
        for first in range(0, len(folders), folders_per_piece):
            pieces.append(ListingPiece(uri, (), folders[first : first + folders_per_piece], base, input_cfg.format))
    return pieces


def list_piece(piece: ListingPiece, storage_options: dict[str, Any]) -> pa.Table:
    """The inputs (`LISTING_SCHEMA` rows, unsorted) of one piece: its files, and every file below its folders."""
    fs = fsspec.core.url_to_fs(piece.uri, **storage_options)[0]
    fs.invalidate_cache()
    try:
        with ThreadPoolExecutor(_LIST_THREADS) as pool:
            walked = list(pool.map(lambda folder: _walk(fs, folder), piece.folders))
    finally:
        fs.invalidate_cache()
    paths = pa.concat_arrays([pa.array(piece.files, pa.string()), *walked])
    kinds = input_kinds(paths, piece.wanted)
    if kinds.null_count:
        keep = pc.is_valid(kinds)
        paths, kinds = paths.filter(keep), kinds.filter(keep)
    sample = paths[0].as_py() if len(paths) else ""
    prefix = fs.unstrip_protocol(sample).removesuffix(sample)  # e.g. "s3://", "file://"
    keys = pc.utf8_ltrim(pc.utf8_slice_codeunits(paths, len(piece.base)), "/")
    return pa.table([keys, pc.binary_join_element_wise(prefix, paths, ""), kinds], schema=LISTING_SCHEMA)


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


def _top_level(
    uri: str, storage_options: dict[str, Any], key: str
) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """One input URI's (uri, root folder, files, folders to walk): a glob's matches, a folder's own files and
    subfolders, or a single file."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    try:
        if has_magic(path):
            wildcard = min(path.index(char) for char in "*?[" if char in path)
            root, entries = path[:wildcard].rpartition("/")[0], fs.glob(path, detail=True)
        elif fs.isdir(path):
            root, entries = path, {entry["name"]: entry for entry in fs.ls(path, detail=True)}
        elif fs.isfile(path):
            return uri, path.rpartition("/")[0], (path,), ()
        else:
            raise InputError(f"{key}: {uri} does not exist")
    finally:
        fs.invalidate_cache()
    files = tuple(sorted(name for name, info in entries.items() if info["type"] != "directory"))
    return uri, root, files, tuple(sorted(name for name, info in entries.items() if info["type"] == "directory"))


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
