"""What a dataset holds, as its manifest says: the listing (`pipeline.storage.listing.LISTING_SCHEMA`) of a run with
`input.manifest`, made without listing the store.

A manifest is one of:

- a Parquet or CSV file (CSV with a header row; `.csv.gz` too), or a folder of them, with a column `key`: object
  names relative to `input.uri`, one per image, or one per WebDataset / Parquet shard;
- an S3 Inventory `manifest.json`: its data files (CSV, Parquet or ORC, in the destination bucket) list every
  object of the source bucket; the keys under `input.uri`'s prefix are the inputs (CSV keys are URL-decoded, as
  S3 Inventory URL-encodes them there).

A key's kind is its extension's, as in a listing (`format` keeps only that kind; other and hidden files are
skipped). Only the `key` column is read (the bucket too, for an inventory), and no input is opened.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Protocol
from urllib.parse import unquote_plus

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.orc as orc
import pyarrow.parquet as pq

from pipeline.storage.listing import LISTING_SCHEMA, InputError, check_unique, input_kinds, wanted_kinds

_TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
_INVENTORY_FORMATS = ("CSV", "Parquet", "ORC")


class ManifestSpec(Protocol):
    """What reading a manifest needs of the input section (`pipeline.labelling.InputConfig`)."""

    manifest: str
    uri: str
    format: str


def read_manifest(input_cfg: ManifestSpec, storage_options: dict[str, Any]) -> pa.Table:
    """The inputs `input_cfg.manifest` names under `input_cfg.uri`, as a `LISTING_SCHEMA` table sorted by key."""
    fs, path = fsspec.core.url_to_fs(input_cfg.manifest, **storage_options)
    if posixpath.basename(path) == "manifest.json":
        keys = _inventory_keys(fs, path, input_cfg, storage_options)
    else:
        keys = pa.concat_arrays([pa.array([], pa.string()), *(_table_keys(fs, file) for file in _tables(fs, path))])
    if keys.null_count or (len(keys) and not pc.all(pc.greater(pc.utf8_length(keys), 0)).as_py()):
        raise InputError(f"input.manifest: {input_cfg.manifest} has empty keys")
    kinds = input_kinds(keys, input_cfg.format)
    keep = pc.is_valid(kinds)
    keys, kinds = keys.filter(keep), kinds.filter(keep)
    if len(keys) == 0:
        raise InputError(f"input.manifest: no {wanted_kinds(input_cfg.format)} keys in {input_cfg.manifest}")
    root_fs, root = fsspec.core.url_to_fs(input_cfg.uri, **storage_options)
    sources = pc.binary_join_element_wise(root_fs.unstrip_protocol(root.rstrip("/")) + "/", keys, "")
    listing = pa.table([keys, sources, kinds], schema=LISTING_SCHEMA).sort_by("key")
    check_unique(listing, "input.manifest")
    return listing


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


def _table_keys(fs: fsspec.AbstractFileSystem, path: str) -> pa.Array:
    """The `key` column of one Parquet or CSV manifest file, as strings."""
    uri = fs.unstrip_protocol(path)
    with fs.open(path, "rb", compression="infer" if path.endswith(".gz") else None) as handle:
        if path.endswith(".parquet"):
            file = pq.ParquetFile(handle)
            if "key" not in file.schema_arrow.names:
                raise InputError(f"input.manifest: {uri} has no column 'key' (columns: {file.schema_arrow.names})")
            column = file.read(columns=["key"])["key"]
        else:
            try:
                options = pv.ConvertOptions(include_columns=["key"], column_types={"key": pa.string()})
                column = pv.read_csv(handle, convert_options=options)["key"]
            except (pa.ArrowInvalid, KeyError) as error:
                raise InputError(f"input.manifest: {uri} has no column 'key' ({error})") from None
    return column.cast(pa.string()).combine_chunks()


def _inventory_keys(
    fs: fsspec.AbstractFileSystem, path: str, input_cfg: ManifestSpec, storage_options: dict[str, Any]
) -> pa.Array:
    """The keys under `input_cfg.uri`'s prefix, relative to it, of the S3 Inventory whose manifest is `path`."""
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
    columns = [name.strip() for name in manifest.get("fileSchema", "Bucket, Key").split(",")]
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    parts = [pa.array([], pa.string())]
    for file in manifest["files"]:
        data = f"{protocol}://{destination}/{file['key']}"
        keys = _inventory_file_keys(data, file_format, columns, storage_options)
        under = keys.filter(pc.starts_with(keys, prefix)) if prefix else keys
        parts.append(pc.utf8_slice_codeunits(under, len(prefix)))
    return pa.concat_arrays(parts)


def _inventory_file_keys(uri: str, file_format: str, columns: list[str], storage_options: dict[str, Any]) -> pa.Array:
    """The object keys of one inventory data file (gzipped CSV without a header, Parquet or ORC)."""
    with fsspec.open(uri, "rb", compression="gzip" if file_format == "CSV" else None, **storage_options) as handle:
        if file_format == "CSV":
            read = pv.ReadOptions(column_names=columns)
            convert = pv.ConvertOptions(include_columns=["Key"], column_types={"Key": pa.string()})
            keys = pv.read_csv(handle, read_options=read, convert_options=convert)["Key"].combine_chunks()
            return _url_decoded(keys)
        read_table = pq.read_table if file_format == "Parquet" else orc.read_table
        table = read_table(handle, columns=["key"])
    return table["key"].cast(pa.string()).combine_chunks()


def _url_decoded(keys: pa.Array) -> pa.Array:
    """S3 Inventory CSV keys, URL-encoded as its docs say (`+` for a space, `%XX` for other bytes)."""
    encoded = pc.match_substring_regex(keys, r"[%+]")
    if not pc.any(encoded).as_py():
        return keys
    decoded = pa.array([unquote_plus(key) for key in keys.filter(encoded).to_pylist()], pa.string())
    return pc.replace_with_mask(keys, encoded, decoded)
