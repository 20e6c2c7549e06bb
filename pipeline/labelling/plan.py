"""What is left to do, one partition of a run's keys at a time (`pipeline.labelling.work` runs these in Ray tasks):
the work items (`pending_inputs`) and their count (`count_inputs`), given what an output already holds (the index
rows of `labels/`: `INDEX_COLUMNS`, no mask bytes), and the rows that cleaning drops (`losers`).

A work item (`WORK_SCHEMA`) is a listed input (`pipeline.storage.listing.LISTING_SCHEMA`) with `skip`, the keys of
the shard's members already done; `pipeline.storage.formats.read_inputs` reads them on Ray.

Which row of a key wins, when a key is in `labels/` more than once (an error row relabelled, a row
relabelled by another model, a retried write that re-batched): an `ok` row, then one made by this run's
model and prompt set, then the latest `labeled_at`, then the greatest file name and position, so that
a repeated cleaning agrees.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage.formats import shard_image_names
from pipeline.storage.listing import LISTING_SCHEMA, SHARD_MEMBER_KEY
from pipeline.storage.output import LABELS_SCHEMA
from pipeline.storage.retry import Retry

WORK_SCHEMA = pa.schema([*LISTING_SCHEMA, pa.field("skip", pa.list_(pa.string()))])  # skip: done member keys
INDEX_COLUMNS = ("key", "status", "model", "prompt_set", "labeled_at", "shard_images")
INDEX_SCHEMA = pa.schema([LABELS_SCHEMA.field(name) for name in INDEX_COLUMNS])
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


def index_rows(table: pa.Table) -> pa.Table:
    """The index columns of labels rows; columns that files written before they existed lack are null."""
    columns = [
        table[name] if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(INDEX_COLUMNS, INDEX_SCHEMA)
    ]
    return pa.Table.from_arrays(columns, schema=INDEX_SCHEMA)


def losers(index: pa.Table, model: str, prompt_set: str) -> pa.Table:
    """The rows (`file`, `row`) of `index` that lose to another row of their key (see the module docstring).

    `index` holds every row of its keys, with `file` (its file's position in name order) and `row` (its position
    in the file); `model` and `prompt_set` are this run's."""
    made_here = pc.and_(pc.equal(index["model"], model), pc.equal(index["prompt_set"], prompt_set))
    order = (
        index.select(["key", "labeled_at", "file", "row"])
        .append_column("not_ok", pc.not_equal(index["status"], "ok"))
        .append_column("not_here", pc.invert(pc.fill_null(made_here, False)))
        .sort_by(
            [
                ("key", "ascending"),
                ("not_ok", "ascending"),
                ("not_here", "ascending"),
                ("labeled_at", "descending"),
                ("file", "descending"),
                ("row", "descending"),
            ]
        )
    )
    keys = order["key"].combine_chunks()
    first = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        first[1:] = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    return order.select(["file", "row"]).filter(pa.array(~first))
