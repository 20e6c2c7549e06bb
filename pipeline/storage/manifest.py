"""What a dataset holds, as its manifest says: the inputs of a run with `input.manifest`, found without listing the
store.

A manifest is one of:

- a Parquet or CSV file (CSV with a header row; `.csv.gz` too), or a folder of them, with a column `key`: object
  names relative to `input.uri`, one per image, or one per WebDataset / Parquet shard;
- an S3 Inventory `manifest.json`: its data files (CSV, Parquet or ORC, in the destination bucket) list every
  object of the source bucket; the keys under `input.uri`'s prefix are the inputs (CSV keys are URL-decoded, as
  S3 Inventory URL-encodes them there).

The driver only finds the manifest's files and reads the Parquet footers (`manifest_pieces`); Ray tasks read the
keys, a `ManifestPiece` each (`read_piece`). A key's kind is its extension's, as in a listing (`format` keeps only
that kind; other and hidden files are skipped). Only the `key` column is read, and no input is opened.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_plus

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.orc as orc
import pyarrow.parquet as pq

from pipeline.storage.listing import LISTING_SCHEMA, InputError, input_kinds

_TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
_INVENTORY_FORMATS = ("CSV", "Parquet", "ORC")
PIECE_ROWS = 1 << 20  # keys a task reads, about: Parquet row groups (and small files) are grouped up to it
_CSV_BYTES_PER_KEY = 16  # a CSV file's keys, guessed from its size (a low guess: more partitions, never fewer)


class ManifestSpec(Protocol):
    """What reading a manifest needs of the input section (`pipeline.labelling.InputConfig`)."""

    manifest: str
    uri: str
    format: str


@dataclass(frozen=True)
class ManifestFile:
    """One manifest file, or some of its Parquet row groups (None: all of it)."""

    uri: str
    file_format: str  # "parquet" or "csv" (a key column); "CSV", "Parquet" or "ORC" (an S3 Inventory data file)
    row_groups: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ManifestPiece:
    """What one Ray task reads: some manifest files, about `rows` keys."""

    files: tuple[ManifestFile, ...]
    rows: int
    inventory_columns: tuple[str, ...] = ()  # an S3 Inventory's CSV columns (its fileSchema)
    inventory_prefix: str = ""  # an S3 Inventory's keys are taken under it, and made relative to it


def manifest_pieces(input_cfg: ManifestSpec, storage_options: dict[str, Any]) -> list[ManifestPiece]:
    """The pieces of `input_cfg.manifest` (files, footers of Parquet files; no keys read). Raises `InputError` where
    the manifest is missing, holds no table files, or a Parquet file has no column `key`."""
    fs, path = fsspec.core.url_to_fs(input_cfg.manifest, **storage_options)
    if posixpath.basename(path) == "manifest.json":
        return _inventory_pieces(fs, path, input_cfg)
    units = []
    for file in _tables(fs, path):
        uri = fs.unstrip_protocol(file)
        if not file.endswith(".parquet"):
            units.append((ManifestFile(uri, "csv"), max(1, fs.size(file) // _CSV_BYTES_PER_KEY)))
            continue
        with fs.open(file, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
        if "key" not in metadata.schema.names:
            raise InputError(f"input.manifest: {uri} has no column 'key' (columns: {metadata.schema.names})")
        units += [
            (ManifestFile(uri, "parquet", (group,)), metadata.row_group(group).num_rows)
            for group in range(metadata.num_row_groups)
        ]
    return _grouped(units)


def _grouped(units: list[tuple[ManifestFile, int]], **inventory: Any) -> list[ManifestPiece]:
    """Consecutive files (and row groups of one file) as pieces of about `PIECE_ROWS` keys."""
    pieces, files, rows = [], [], 0
    for file, file_rows in units:
        if files and files[-1].uri == file.uri and file.row_groups:
            files[-1] = ManifestFile(file.uri, file.file_format, (*files[-1].row_groups, *file.row_groups))
        else:
            files.append(file)
        rows += file_rows
        if rows >= PIECE_ROWS:
            pieces.append(ManifestPiece(tuple(files), rows, **inventory))
            files, rows = [], 0
    if files:
        pieces.append(ManifestPiece(tuple(files), rows, **inventory))
    return pieces


def read_piece(piece: ManifestPiece, input_cfg: ManifestSpec, storage_options: dict[str, Any]) -> pa.Table:
    """The inputs (`LISTING_SCHEMA` rows, unsorted) of one piece: its keys of the wanted kinds, with their sources
    under `input_cfg.uri`. Raises `InputError` for a file without a column `key`, or with empty keys."""
    keys = pa.concat_arrays(
        [pa.array([], pa.string()), *(_file_keys(file, piece, storage_options) for file in piece.files)]
    )
    if keys.null_count or (len(keys) and not pc.all(pc.greater(pc.utf8_length(keys), 0)).as_py()):
        raise InputError(f"input.manifest: {input_cfg.manifest} has empty keys")
    kinds = input_kinds(keys, input_cfg.format)
    keep = pc.is_valid(kinds)
    keys, kinds = keys.filter(keep), kinds.filter(keep)
    root_fs, root = fsspec.core.url_to_fs(input_cfg.uri, **storage_options)
    sources = pc.binary_join_element_wise(root_fs.unstrip_protocol(root.rstrip("/")) + "/", keys, "")
    return pa.table([keys, sources, kinds], schema=LISTING_SCHEMA)


def _tables(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The manifest's files: `path` itself, or the Parquet and CSV files below the folder `path`."""
    if fs.isfile(path):
        return [path]
    if not fs.isdir(path):
        raise InputError(f"input.manifest: {fs.unstrip_protocol(path)} does not exist")
    files = sorted(name for name in fs.find(path) if name.endswith(_TABLE_SUFFIXES))
    if not files:
        raise InputError(f"input.manifest: no .parquet or .csv files in {fs.unstrip_protocol(path)}")
    return files


def _file_keys(file: ManifestFile, piece: ManifestPiece, storage_options: dict[str, Any]) -> pa.Array:
    """The keys of one manifest file, as strings (an inventory's: those under its prefix, made relative)."""
    compression = "gzip" if file.file_format == "CSV" or file.uri.endswith(".gz") else None
    with fsspec.open(file.uri, "rb", compression=compression, **storage_options) as handle:
        if file.file_format == "parquet":
            column = pq.ParquetFile(handle).read_row_groups(list(file.row_groups), columns=["key"])["key"]
        elif file.file_format == "csv":
            try:
                options = pv.ConvertOptions(include_columns=["key"], column_types={"key": pa.string()})
                column = pv.read_csv(handle, convert_options=options)["key"]
            except (pa.ArrowInvalid, KeyError) as error:
                raise InputError(f"input.manifest: {file.uri} has no column 'key' ({error})") from None
        elif file.file_format == "CSV":
            read = pv.ReadOptions(column_names=list(piece.inventory_columns))
            convert = pv.ConvertOptions(include_columns=["Key"], column_types={"Key": pa.string()})
            column = _url_decoded(
                pv.read_csv(handle, read_options=read, convert_options=convert)["Key"].combine_chunks()
            )
        else:
            column = (pq.read_table if file.file_format == "Parquet" else orc.read_table)(handle, columns=["key"])[
                "key"
            ]
    keys = column.cast(pa.string())
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    prefix = piece.inventory_prefix
    return pc.utf8_slice_codeunits(keys.filter(pc.starts_with(keys, prefix)), len(prefix)) if prefix else keys


def _inventory_pieces(fs: fsspec.AbstractFileSystem, path: str, input_cfg: ManifestSpec) -> list[ManifestPiece]:
    """The data files of the S3 Inventory whose manifest is `path`, a piece each, keys taken under `input_cfg.uri`."""
    uri = fs.unstrip_protocol(path)
    manifest = json.loads(fs.cat_file(path))
    file_format = manifest.get("fileFormat")
    if file_format not in _INVENTORY_FORMATS or not isinstance(manifest.get("files"), list):
        raise InputError(f"input.manifest: {uri} is not an S3 Inventory manifest (fileFormat CSV, Parquet or ORC)")
    bucket, _, prefix = fsspec.core.strip_protocol(input_cfg.uri).partition("/")
    if bucket != manifest.get("sourceBucket"):
        raise InputError(
            f"input.manifest: {uri} lists bucket {manifest.get('sourceBucket')!r}, input.uri is in {bucket!r}"
        )
    destination = manifest["destinationBucket"].removeprefix("arn:aws:s3:::")
    protocol = fsspec.core.split_protocol(input_cfg.manifest)[0] or "s3"
    columns = tuple(name.strip() for name in manifest.get("fileSchema", "Bucket, Key").split(","))
    units = [
        (ManifestFile(f"{protocol}://{destination}/{file['key']}", file_format), PIECE_ROWS)
        for file in manifest["files"]
    ]
    under = prefix.strip("/") + "/" if prefix.strip("/") else ""
    return _grouped(units, inventory_columns=columns, inventory_prefix=under)


def _url_decoded(keys: pa.Array) -> pa.Array:
    """S3 Inventory CSV keys, URL-encoded as its docs say (`+` for a space, `%XX` for other bytes)."""
    encoded = pc.match_substring_regex(keys, r"[%+]")
    if not pc.any(encoded).as_py():
        return keys
    decoded = pa.array([unquote_plus(key) for key in keys.filter(encoded).to_pylist()], pa.string())
    return pc.replace_with_mask(keys, encoded, decoded)
