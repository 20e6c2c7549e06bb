"""The work of a run, planned on Ray, so that the driver holds counts and object refs, never a row per image.

The inputs (listed rows, or the pieces of a manifest) and the index rows of `labels/` (`pipeline.labelling.plan`'s
`INDEX_COLUMNS`, no mask bytes) meet in hash partitions of their keys:

    input pieces  ── a task each: its rows, by partition ──┐
                                                             ├─ a task per partition: duplicate keys (refused), done
    labels files  ── a task per group: index rows, by part ─┘  keys, finished shards, foreign-label counts, work items

A key `<shard>/<member>` is in its shard's partition (`partition_of`), so that a shard meets the rows of its
members. The work items stay in the object store, tables of shards and of loose files per partition, and stream
into `pipeline.storage.formats.read_inputs`.

After the run (`settle_labels`) the same partitions of the index find the rows that lose to another row of their
key (`pipeline.labelling.plan.losers`); tasks rewrite the files that hold losers, writing a file's winners to a new
file (named from its keys) before the old one is deleted, never deleting a file just written: a kill at any point
leaves every winner in at least one file, and the next cleaning finishes the job. Then the run's files are merged
(`compact_labels`). Error rows sit in files of their own (see `LabelWriter`), so dropping them rewrites small
files, never the mask bytes.
"""

from __future__ import annotations

import functools
import io
import math
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.labelling.plan import (
    INDEX_SCHEMA,
    InputCount,
    count_inputs,
    done_keys,
    foreign_labels,
    index_rows,
    losers,
    pending_inputs,
    shard_images,
    shard_of,
)
from pipeline.storage.listing import (
    LISTING_SCHEMA,
    InputError,
    ListingPiece,
    check_unique,
    list_piece,
    nothing_found,
    wanted_kinds,
)
from pipeline.storage.manifest import ManifestPiece, ManifestSpec, read_piece
from pipeline.storage.output import LABELS_DIR, labels_file_name, parquet_bytes, write_atomically
from pipeline.storage.retry import Retry, storage_failure

if TYPE_CHECKING:
    from pipeline.labelling.config import InputConfig

PARTITION_ROWS = 500_000  # input rows per partition, about
LISTING_FOLDERS_PER_TASK = 16  # top-level folders one listing task walks
_INDEX_FILES_PER_TASK = 4096  # labels files whose index one task reads, at most ...
_INDEX_BYTES_PER_TASK = 256 << 20  # ... or files of about these bytes
_THREADS = 16
_PART_SCHEMA = pa.schema(
    [
        *INDEX_SCHEMA,
        pa.field("file", pa.int32()),  # the file's position in name order
        pa.field("row", pa.int32()),  # the row's position in its file
        pa.field("earlier", pa.bool_()),  # the file was there before the run
    ]
)


@dataclass(frozen=True)
class Inputs:
    """What a run reads, in pieces for Ray tasks: a listing's (top-level files and folders to walk) or a manifest's."""

    pieces: tuple[ListingPiece | ManifestPiece, ...]
    rows: int | None  # a manifest's keys, about; None for a listing (its pieces are listed and counted first)
    spec: InputConfig
    config_key: str  # where the inputs came from, to name in errors


@dataclass(frozen=True)
class LabelsFile:
    """A labels file: its path, bytes, rows and ok rows."""

    path: str
    size: int
    rows: int
    ok: int


@dataclass(frozen=True)
class RunKeys:
    """What a partition's task needs of the run: what made its labels, and for a dry run how to count images."""

    model: str
    prompt_set: str
    config_key: str
    count: tuple[str, dict[str, Any], Retry] | None = None  # (image_column, storage_options, retry) of a dry run


@dataclass(frozen=True)
class Work:
    """A planned run: its work items in the object store, and its counts."""

    shards: list[ray.ObjectRef]  # WORK_SCHEMA tables of shards, one per partition that has any
    loose: list[ray.ObjectRef]  # WORK_SCHEMA tables of loose files, one per partition that has any
    partitions: int
    listed: int  # input files and shards
    skipped: int  # images done before
    pending: int  # work items
    foreign: list[dict]  # ok rows of other models or prompt sets: [{model, prompt_set, rows}], most rows first
    counted: InputCount | None  # a dry run's count


def partition_of(keys: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Each key's partition: a hash of its shard's key for a tar member or Parquet row, else of the key itself."""
    group = pc.coalesce(shard_of(keys), keys)
    return (pd.util.hash_array(group.to_numpy(zero_copy_only=False)) % partitions).astype(np.int32)


def _by_partition(table: pa.Table, partitions: int) -> list[pa.Table]:
    """`table`'s rows in `partitions` tables, by `partition_of` their keys."""
    ids = partition_of(table["key"], partitions)
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(partitions + 1))
    taken = table.take(order)
    return [taken.slice(start, end - start) for start, end in zip(bounds[:-1], bounds[1:])]


def list_labels(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """The labels files of the output at `root` and their sizes, in name order."""
    fs.invalidate_cache()
    folder = f"{root}/{LABELS_DIR}"
    found = fs.find(folder, detail=True) if fs.exists(folder) else {}
    fs.invalidate_cache()
    return {path: int(info["size"]) for path, info in sorted(found.items()) if path.endswith(".parquet")}


def plan_work(
    inputs: Inputs,
    fs: fsspec.AbstractFileSystem,
    labels: dict[str, int],
    run: RunKeys,
    storage_options: dict[str, Any],
    retry: Retry,
) -> Work:
    """Plan a run over `inputs` on Ray, given the output's `labels` files (`list_labels`) on `fs`.

    Raises `InputError` for duplicate keys or a manifest without inputs, and `StorageUnavailable` past `retry`'s
    budget: before any Ray task wrote anything."""
    pieces, rows = list(inputs.pieces), inputs.rows
    if rows is None:  # a listing: walked first, to count its inputs
        walked = [_list_piece.options(num_returns=2).remote(piece, storage_options, retry) for piece in pieces]
        rows = sum(_get([count for count, _ in walked]))
        if rows == 0:
            raise InputError(nothing_found(inputs.spec))
        pieces = [table for _, table in walked]
    partitions = max(1, math.ceil(rows / PARTITION_ROWS))
    input_parts = [
        _split_inputs.options(num_returns=partitions + 1).remote(piece, inputs.spec, storage_options, retry, partitions)
        for piece in pieces
    ]
    _, index_parts = _split_index(fs, labels, (), partitions, retry)
    planned = [
        _plan_partition.options(num_returns=3).remote(
            len(input_parts), run, *(parts[p + 1] for parts in input_parts), *(parts[p + 1] for parts in index_parts)
        )
        for p in range(partitions)
    ]
    del input_parts, index_parts  # the tasks hold what they need
    stats = _get([counts for _, _, counts in planned])
    listed = sum(s["listed"] for s in stats)
    if listed == 0:  # a manifest with no keys of the wanted kinds (a listing that finds none is refused above)
        raise InputError(f"input.manifest: no {wanted_kinds(inputs.spec.format)} keys in {inputs.spec.manifest}")
    foreign: Counter[tuple[str, str]] = Counter()
    for group in (group for s in stats for group in s["foreign"]):
        foreign[group["model"], group["prompt_set"]] += group["rows"]
    counts = [s["counted"] for s in stats if s["counted"] is not None]
    return Work(
        shards=[shards for (shards, _, _), s in zip(planned, stats) if s["shards"]],
        loose=[loose for (_, loose, _), s in zip(planned, stats) if s["pending"] - s["shards"]],
        partitions=partitions,
        listed=listed,
        skipped=sum(s["skipped"] for s in stats),
        pending=sum(s["pending"] for s in stats),
        foreign=[
            {"model": model, "prompt_set": prompt_set, "rows": rows}
            for (model, prompt_set), rows in sorted(foreign.items(), key=lambda item: -item[1])
        ],
        counted=InputCount(*(sum(getattr(c, name) for c in counts) for name in ("files", "images", "skipped")))
        if counts
        else None,
    )


def _get(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """`ray.get`, raising an `InputError` or `StorageUnavailable` of a task as itself."""
    try:
        return ray.get(list(refs))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, InputError):
            raise error.cause from None
        if (failure := storage_failure(error)) is not None:
            raise failure from None
        raise


def _split_index(
    fs: fsspec.AbstractFileSystem, labels: dict[str, int], earlier: Collection[str], partitions: int, retry: Retry
) -> tuple[list[ray.ObjectRef], list[list[ray.ObjectRef]]]:
    """Tasks that read the index of `labels` (files in name order, grouped): refs of their files' counts (`file`,
    `rows`, `ok`) and of their rows by partition."""
    paths, groups, group, size = list(labels), [], [], 0
    for file, path in enumerate(paths):
        group.append(file)
        size += labels[path]
        if len(group) >= _INDEX_FILES_PER_TASK or size >= _INDEX_BYTES_PER_TASK:
            groups.append(group)
            group, size = [], 0
    groups += [group] if group else []
    split = [
        _split_index_files.options(num_returns=partitions + 1).remote(
            fs, [(file, paths[file], paths[file] in earlier) for file in files], partitions, retry
        )
        for files in groups
    ]
    return [parts[0] for parts in split], split


@ray.remote(num_cpus=1)
def _list_piece(piece: ListingPiece, storage_options: dict[str, Any], retry: Retry) -> tuple[int, pa.Table]:
    """Ray task: the inputs of a listing piece, after their count."""
    rows = retry(lambda: list_piece(piece, storage_options), piece.uri)
    return rows.num_rows, rows


@ray.remote(num_cpus=1)
def _split_inputs(
    piece: pa.Table | ManifestPiece,
    spec: ManifestSpec,
    storage_options: dict[str, Any],
    retry: Retry,
    partitions: int,
) -> tuple:
    """Ray task: the input rows of a piece (a listed table, or a manifest's piece) by partition, after their count
    (so that the task has two returns at least: Ray gives one ref, not a list, for one)."""
    if isinstance(piece, ManifestPiece):
        rows = retry(lambda: read_piece(piece, spec, storage_options), spec.manifest)
    else:
        rows = piece
    return (rows.num_rows, *_by_partition(rows, partitions))


@ray.remote(num_cpus=1)
def _split_index_files(
    fs: fsspec.AbstractFileSystem, files: list[tuple[int, str, bool]], partitions: int, retry: Retry
) -> tuple:
    """Ray task: the counts (`file`, `rows`, `ok`) of some labels files (file number, path, there before the run),
    then their index rows (`_PART_SCHEMA`) by partition. Reads footers and the index columns only."""

    def read(file: int, path: str, earlier: bool) -> pa.Table:
        rows = retry(lambda: read_file_index(fs, path), fs.unstrip_protocol(path))
        return (
            rows.append_column("file", pa.array(np.full(rows.num_rows, file, np.int32)))
            .append_column("row", pa.array(np.arange(rows.num_rows, dtype=np.int32)))
            .append_column("earlier", pa.array(np.full(rows.num_rows, earlier)))
        )

    with ThreadPoolExecutor(_THREADS) as pool:
        tables = list(pool.map(lambda item: read(*item), files))
    counts = pa.table(
        {
            "file": [file for file, _, _ in files],
            "rows": [table.num_rows for table in tables],
            "ok": [pc.sum(pc.equal(table["status"], "ok")).as_py() or 0 for table in tables],
        }
    )
    return (counts, *_by_partition(pa.concat_tables([_PART_SCHEMA.empty_table(), *tables]), partitions))


def read_file_index(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """The index rows of one labels file: its footer and index columns, without read-ahead."""
    with fs.open(path, "rb", cache_type="none") as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True)
        return index_rows(
            parquet.read(columns=[name for name in INDEX_SCHEMA.names if name in parquet.schema_arrow.names])
        )


@ray.remote(num_cpus=1)
def _plan_partition(inputs: int, run: RunKeys, *parts: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Ray task: a partition's work items (shards, loose files) and counts, from its input rows (the first `inputs`
    of `parts`) and index rows (the rest)."""
    listing = pa.concat_tables([LISTING_SCHEMA.empty_table(), *parts[:inputs]]).sort_by("key")
    check_unique(listing, run.config_key)
    index = pa.concat_tables([_PART_SCHEMA.empty_table(), *parts[inputs:]])
    done = done_keys(index, run.model, run.prompt_set)
    listed = listing["key"]
    skipped = pc.sum(pc.or_(pc.is_in(done, listed), pc.is_in(shard_of(done), listed))).as_py() or 0
    work = pending_inputs(listing, done, shard_images(index))
    loose = pc.equal(work["kind"], "images")
    shards = work.filter(pc.invert(loose))
    counted = None
    if run.count is not None:
        image_column, storage_options, retry = run.count
        counted = count_inputs(listing, image_column, storage_options, retry=retry, done=done)
    stats = {
        "listed": listing.num_rows,
        "skipped": skipped,
        "pending": work.num_rows,
        "shards": shards.num_rows,
        "foreign": foreign_labels(index, run.model, run.prompt_set),
        "counted": counted,
    }
    return shards, work.filter(loose), stats


# --- after the run ----------------------------------------------------------------------------


def settle_labels(
    fs: fsspec.AbstractFileSystem,
    root: str,
    earlier: Collection[str],
    run: RunKeys,
    partitions: int,
    target_bytes: int,
    retry: Retry,
) -> tuple[list[LabelsFile], int]:
    """Leave each key in `labels/` once (the winner), then merge this run's files (`compact_labels`); `earlier` are
    the files there before the run. Returns the labels files now, and how many keys they hold that `earlier` did
    not."""
    labels = retry(lambda: list_labels(fs, root), fs.unstrip_protocol(root))
    counts, index_parts = _split_index(fs, labels, set(earlier), partitions, retry)
    settled = [
        _settle_partition.options(num_returns=2).remote(run, *(parts[p + 1] for parts in index_parts))
        for p in range(partitions)
    ]
    del index_parts
    lost = pa.concat_tables([_PART_SCHEMA.empty_table().select(["file", "row"]), *_get([lost for lost, _ in settled])])
    added = sum(_get([new for _, new in settled]))
    paths = list(labels)
    files = {
        paths[file]: LabelsFile(paths[file], labels[paths[file]], rows, ok)
        for table in _get(counts)
        for file, rows, ok in zip(*(table[name].to_pylist() for name in ("file", "rows", "ok")))
    }
    per_file = lost.group_by("file").aggregate([("row", "list")])
    lost_rows = {
        paths[file]: rows for file, rows in zip(per_file["file"].to_pylist(), per_file["row_list"].to_pylist())
    }
    rewrites = {path: rows for path, rows in lost_rows.items() if len(rows) < files[path].rows}
    written = _get([_rewrite_file.remote(fs, root, path, rows, retry) for path, rows in sorted(rewrites.items())])
    kept = {file.path for file in written}
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda path: retry(lambda: _remove(fs, path), path), [p for p in lost_rows if p not in kept]))
    files = [file for path, file in files.items() if path not in lost_rows] + written
    return compact_labels(fs, root, files, earlier, target_bytes, retry), added


@ray.remote(num_cpus=1)
def _settle_partition(run: RunKeys, *parts: pa.Table) -> tuple[pa.Table, int]:
    """Ray task: a partition's losing rows (`file`, `row`), and how many of its keys no earlier file holds."""
    index = pa.concat_tables([_PART_SCHEMA.empty_table(), *parts])
    per_key = index.group_by("key").aggregate([("earlier", "any")])
    return losers(index, run.model, run.prompt_set), pc.sum(pc.invert(per_key["earlier_any"])).as_py() or 0


@ray.remote(num_cpus=0.5)
def _rewrite_file(fs: fsspec.AbstractFileSystem, root: str, path: str, lost: list[int], retry: Retry) -> LabelsFile:
    """Ray task: the rows of labels file `path` but those at `lost`, written to a file of their own; the caller deletes
    `path` once every rewrite is written."""
    full = pq.read_table(io.BytesIO(retry(functools.partial(fs.cat_file, path), path)))
    return _write_labels(fs, root, full.take(sorted(set(range(full.num_rows)) - set(lost))), retry)


def compact_labels(
    fs: fsspec.AbstractFileSystem,
    root: str,
    files: list[LabelsFile],
    earlier: Collection[str],
    target_bytes: int,
    retry: Retry,
) -> list[LabelsFile]:
    """Merge the labels files of this run (those not in `earlier`) into files of about `target_bytes`, so that a
    large run leaves few files for a resume to open; returns the labels files now. Earlier runs' files are never
    rewritten.

    ok and error rows stay in files of their own. The merges run as Ray tasks (the driver never holds the rows); each
    writes its file (named from its keys) before it deletes the parts, so a kill leaves every row in some file, at
    worst twice, which the next cleaning settles. Each task retries its storage calls with `retry`."""
    if target_bytes <= 0:
        return files
    groups = []
    for errors in (False, True):
        group, size = [], 0
        for file in sorted(
            (f for f in files if f.path not in earlier and (f.rows > 0 and f.ok == 0) == errors), key=lambda f: f.path
        ):
            group.append(file.path)
            size += file.size
            if size >= target_bytes:
                groups.append(group)
                group, size = [], 0
        groups.append(group)
    groups = [group for group in groups if len(group) > 1]
    merged = _get([_merge_files.remote(fs, root, group, retry) for group in groups])
    gone = {path for group in groups for path in group}
    return [file for file in files if file.path not in gone] + merged


def _write_labels(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table, retry: Retry) -> LabelsFile:
    """Write `table`'s rows as a labels file named from its keys."""
    target = f"{root}/{LABELS_DIR}/{labels_file_name(table['key'].to_pylist())}"
    data = parquet_bytes(table)
    retry(functools.partial(write_atomically, fs, root, target, data), fs.unstrip_protocol(target))
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    return LabelsFile(target, len(data), table.num_rows, ok)


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete `path`; one gone already (a retried call's first try) is fine."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


@ray.remote(num_cpus=0.5)
def _merge_files(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], retry: Retry) -> LabelsFile:
    """Ray task: the rows of `paths` as one labels file, written before the parts are deleted."""
    parts = [pq.read_table(io.BytesIO(retry(functools.partial(fs.cat_file, path), path))) for path in paths]
    merged = _write_labels(fs, root, pa.concat_tables(parts, promote_options="default"), retry)
    for path in paths:
        retry(functools.partial(_remove, fs, path), path)
    return merged
