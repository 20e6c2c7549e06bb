"""What is left to do: the work items of a run (`pending_inputs`) and their count (`count_inputs`), given what an
output already holds: the resume index of `labels/`, and the cleaning that keeps each key once.

A work item (`WORK_SCHEMA`) is a listed input (`pipeline.storage.listing.LISTING_SCHEMA`) with `skip`, the keys of
the shard's members already done; `pipeline.storage.formats.read_inputs` reads them on Ray.

The index holds, for every row of every labels file, the few columns resume needs (`INDEX_COLUMNS`:
no mask bytes). Each file is read with a column projection and without read-ahead (`cache_type="none"`),
so a read fetches the Parquet footer and the small column chunks, not the whole file; files are read
in parallel. A run reads the index once before it starts and, after it ends, only the files it does not
know yet (those it wrote, and any a retried task left behind).

Which row of a key wins, when a key is in `labels/` more than once (an error row relabelled, a row
relabelled by another model, a retried write that re-batched): an `ok` row, then one made by this run's
model and prompt set, then the latest `labeled_at`, then the greatest file name and position, so that
a repeated cleaning agrees. The cleaning writes a file's winners to a new file (named from its keys)
before it deletes the old one, and never deletes a file it has just written: a kill at any point
leaves every winner in at least one file, and the next cleaning finishes the job. Error rows sit in
files of their own (see `LabelWriter`), so dropping them rewrites small files, never the mask bytes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.storage.formats import shard_image_names
from pipeline.storage.listing import LISTING_SCHEMA, SHARD_MEMBER_KEY
from pipeline.storage.output import LABELS_DIR, LABELS_SCHEMA, labels_file_name, parquet_bytes, write_atomically
from pipeline.storage.retry import Retry

WORK_SCHEMA = pa.schema([*LISTING_SCHEMA, pa.field("skip", pa.list_(pa.string()))])  # skip: done member keys
INDEX_COLUMNS = ("key", "status", "model", "prompt_set", "labeled_at", "shard_images")
_INDEX_SCHEMA = pa.schema([LABELS_SCHEMA.field(name) for name in INDEX_COLUMNS])
_THREADS = 16


@dataclass(frozen=True)
class InputCount:
    """What `count_inputs` finds: listed files, images a full run would label, and how many to skip."""

    files: int
    images: int
    skipped: int


# --- the work of a run ------------------------------------------------------------------------


def shard_of(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The shard key of each key `<shard>/<member>` of a tar member or Parquet row; null for other keys."""
    return pc.struct_field(pc.extract_regex(keys, SHARD_MEMBER_KEY), [0])


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


def count_inputs(
    listing: pa.Table,
    image_column: str,
    storage_options: dict[str, Any],
    *,
    retry: Retry,
    done: pa.Array | None = None,
) -> InputCount:
    """Count the images without reading them (for --dry-run): tar headers only, Parquet row counts from the footer.

    A shard that cannot be read counts as one image: a run turns it into one error row.
    """
    done = pa.array([], pa.string()) if done is None else done
    loose = listing.filter(pc.equal(listing["kind"], "images"))
    shards = listing.filter(pc.not_equal(listing["kind"], "images")).to_pylist()
    done_members = set(done.filter(pc.is_valid(shard_of(done))).to_pylist())

    def count_shard(shard: dict[str, str]) -> tuple[int, int]:
        try:
            names = retry(
                lambda: shard_image_names(shard["source"], shard["kind"], image_column, storage_options),
                shard["source"],
            )
        except Exception:
            return 1, 0
        return len(names), sum(f"{shard['key']}/{name}" in done_members for name in names)

    with ThreadPoolExecutor(_THREADS) as pool:
        shard_counts = list(pool.map(count_shard, shards))
    return InputCount(
        files=listing.num_rows,
        images=loose.num_rows + sum(images for images, _ in shard_counts),
        skipped=(pc.sum(pc.is_in(loose["key"], value_set=done)).as_py() or 0) + sum(n for _, n in shard_counts),
    )


# --- what an output holds ---------------------------------------------------------------------


@dataclass
class LabelsIndex:
    """The index rows of each labels file, and its size in bytes, by the file's path."""

    files: dict[str, pa.Table] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def table(self) -> pa.Table:
        """All rows, with `file` (position of the file's path in sorted order) and `row` (position in the file)."""
        paths = sorted(self.files)
        parts = [
            self.files[path]
            .append_column("file", pa.array(np.full(self.files[path].num_rows, i, np.int32)))
            .append_column("row", pa.array(np.arange(self.files[path].num_rows, dtype=np.int32)))
            for i, path in enumerate(paths)
        ]
        empty = _INDEX_SCHEMA.empty_table().append_column("file", pa.array([], pa.int32()))
        return pa.concat_tables([empty.append_column("row", pa.array([], pa.int32())), *parts])

    @property
    def num_rows(self) -> int:
        return sum(table.num_rows for table in self.files.values())

    def replaced(self, gone: Container[str], written: list[WrittenFile]) -> LabelsIndex:
        """The index once the files `gone` are deleted and the files `written` are there."""
        files = {path: rows for path, rows in self.files.items() if path not in gone}
        sizes = {path: size for path, size in self.sizes.items() if path not in gone}
        return LabelsIndex(
            {**files, **{file.path: file.rows for file in written}}, {**sizes, **{f.path: f.size for f in written}}
        )


@dataclass(frozen=True)
class WrittenFile:
    """A labels file just written: its path, index rows and size in bytes."""

    path: str
    rows: pa.Table
    size: int


def _labels_file(root: str, table: pa.Table) -> tuple[str, bytes]:
    """Where the labels file of `table`'s rows goes (named from its keys), and its bytes."""
    return f"{root}/{LABELS_DIR}/{labels_file_name(table['key'].to_pylist())}", parquet_bytes(table)


def read_index(fs: fsspec.AbstractFileSystem, root: str, known: LabelsIndex | None = None) -> LabelsIndex:
    """The index of `labels/` as it is now; files already in `known` are not read again."""
    known = known or LabelsIndex()
    fs.invalidate_cache()
    folder = f"{root}/{LABELS_DIR}"
    found = fs.find(folder, detail=True) if fs.exists(folder) else {}
    sizes = {path: int(info["size"]) for path, info in sorted(found.items()) if path.endswith(".parquet")}
    fs.invalidate_cache()
    new = [path for path in sizes if path not in known.files]
    with ThreadPoolExecutor(_THREADS) as pool:
        read = dict(zip(new, pool.map(lambda path: _read_file_index(fs, path), new)))
    return LabelsIndex({path: known.files.get(path) or read[path] for path in sizes}, sizes)


def _read_file_index(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    with fs.open(path, "rb", cache_type="none") as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True)
        return _index_rows(parquet.read(columns=[name for name in INDEX_COLUMNS if name in parquet.schema_arrow.names]))


def _index_rows(table: pa.Table) -> pa.Table:
    """The index columns of labels rows; columns that files written before they existed lack are null."""
    columns = [
        table[name] if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(INDEX_COLUMNS, _INDEX_SCHEMA)
    ]
    return pa.Table.from_arrays(columns, schema=_INDEX_SCHEMA)


def done_keys(index: pa.Table, model: str, prompt_set: str) -> pa.Array:
    """The keys (sorted, once each) that have an ok row made by this model and prompt set."""
    made_here = pc.and_(pc.equal(index["model"], model), pc.equal(index["prompt_set"], prompt_set))
    keys = pc.filter(index["key"], pc.and_(pc.equal(index["status"], "ok"), made_here))
    return pc.unique(keys.combine_chunks()).sort()


def shard_images(index: pa.Table) -> pa.Table:
    """(`shard`, `images`): the image count of each shard that a row of `labels/` knows."""
    known = index.filter(pc.is_valid(index["shard_images"]))
    shards = pa.table({"shard": shard_of(known["key"]), "images": known["shard_images"]})
    counts = shards.filter(pc.is_valid(shards["shard"])).group_by("shard").aggregate([("images", "max")])
    return counts.rename_columns(["shard", "images"])


def foreign_labels(index: pa.Table, model: str, prompt_set: str) -> list[dict]:
    """The ok rows made by another model or prompt set: [{model, prompt_set, rows}], most rows first."""
    other = pc.or_(pc.not_equal(index["model"], model), pc.not_equal(index["prompt_set"], prompt_set))
    rows = index.filter(pc.and_(pc.equal(index["status"], "ok"), pc.fill_null(other, True)))
    groups = rows.group_by(["model", "prompt_set"]).aggregate([("key", "count")])
    return sorted(
        ({"model": g["model"], "prompt_set": g["prompt_set"], "rows": g["key_count"]} for g in groups.to_pylist()),
        key=lambda group: -group["rows"],
    )


def clean_labels(
    fs: fsspec.AbstractFileSystem, root: str, index: LabelsIndex, model: str, prompt_set: str
) -> LabelsIndex:
    """Leave each key in `labels/` once (the winner, see the module docstring); returns the new index."""
    table = index.table()
    if table.num_rows == 0:
        return index
    made_here = pc.and_(pc.equal(table["model"], model), pc.equal(table["prompt_set"], prompt_set))
    table = table.append_column("not_ok", pc.not_equal(table["status"], "ok"))
    table = table.append_column("not_here", pc.invert(pc.fill_null(made_here, False)))
    order = table.sort_by(
        [
            ("key", "ascending"),
            ("not_ok", "ascending"),
            ("not_here", "ascending"),
            ("labeled_at", "descending"),
            ("file", "descending"),
            ("row", "descending"),
        ]
    )
    keys = order["key"].combine_chunks()
    first = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        first[1:] = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    losers = order.filter(pa.array(~first))
    if losers.num_rows == 0:
        return index
    paths = sorted(index.files)
    lost_rows: dict[str, set[int]] = {}
    for file, row in zip(losers["file"].to_pylist(), losers["row"].to_pylist()):
        lost_rows.setdefault(paths[file], set()).add(row)
    rewrites = {path: rows for path, rows in lost_rows.items() if len(rows) < index.files[path].num_rows}

    def rewrite(path: str) -> WrittenFile:
        full = pq.read_table(io.BytesIO(fs.cat_file(path)))
        kept = full.take(sorted(set(range(full.num_rows)) - rewrites[path]))
        target, data = _labels_file(root, kept)
        write_atomically(fs, root, target, data)
        return WrittenFile(target, _index_rows(kept), len(data))

    with ThreadPoolExecutor(_THREADS) as pool:
        written = list(pool.map(rewrite, sorted(rewrites)))
        kept_paths = {file.path for file in written}
        list(pool.map(fs.rm_file, [path for path in lost_rows if path not in kept_paths]))
    return index.replaced(lost_rows, written)


def compact_labels(
    fs: fsspec.AbstractFileSystem,
    root: str,
    index: LabelsIndex,
    earlier: Container[str],
    target_bytes: int,
    retry: Retry,
) -> LabelsIndex:
    """Merge the labels files of this run (those not in `earlier`) into files of about `target_bytes`, so that a
    large run leaves few files for a resume to open; returns the new index. Earlier runs' files are never rewritten.

    ok and error rows stay in files of their own. The merges run as Ray tasks (the driver never holds the rows); each
    writes its file (named from its keys) before it deletes the parts, so a kill leaves every row in some file, at
    worst twice, which the next cleaning settles. Each task retries its storage calls with `retry`."""
    if target_bytes <= 0:
        return index
    groups = []
    for errors in (False, True):
        group, size = [], 0
        for path in (p for p in index.files if p not in earlier and _only_errors(index.files[p]) == errors):
            group.append(path)
            size += index.sizes.get(path, 0)
            if size >= target_bytes:
                groups.append(group)
                group, size = [], 0
        groups.append(group)
    groups = [group for group in groups if len(group) > 1]
    merged = ray.get([_merge_files.remote(fs, root, group, retry) for group in groups])
    return index.replaced({path for group in groups for path in group}, merged)


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete `path`; one gone already (a retried call's first try) is fine."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _only_errors(rows: pa.Table) -> bool:
    return rows.num_rows > 0 and not pc.any(pc.equal(rows["status"], "ok")).as_py()


@ray.remote(num_cpus=0.5)
def _merge_files(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], retry: Retry) -> WrittenFile:
    """Ray task: the rows of `paths` as one labels file, written before the parts are deleted."""
    parts = [pq.read_table(io.BytesIO(retry(functools.partial(fs.cat_file, path), path))) for path in paths]
    table = pa.concat_tables(parts, promote_options="default")
    target, data = _labels_file(root, table)
    retry(functools.partial(write_atomically, fs, root, target, data), fs.unstrip_protocol(target))
    for path in paths:
        retry(functools.partial(_remove, fs, path), path)
    return WrittenFile(target, _index_rows(table), len(data))
