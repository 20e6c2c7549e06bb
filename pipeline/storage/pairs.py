"""Labelled data: pairs of an image and its class-id mask, from the job's three input formats, on Ray Data.

- **images**: loose files, each image `NAME.<ext>` with its mask `NAME.png` beside it (`NAME.mask.png` when the image
  is a PNG itself), as in a prompt set;
- **webdataset**: `.tar` shards whose samples hold an image member and a mask member of the same basename prefix,
  the mask's field being `mask_field` (`0001.jpg` + `0001.seg.png`);
- **parquet**: shards with the image in `image_column` and the mask in `mask_column` (bytes, or the Hugging Face
  `{bytes, path}` struct);
- **coco**: a COCO instances JSON (a URI ending in `.json`), as CVAT and Label Studio export corrected labels: each
  image's annotations (polygons or RLE, through `pycocotools`) painted into its mask, a category by its name's
  position in `classes` (the others left background; without `classes`, by its id). An image's `file_name` is taken
  relative to the JSON's folder, or to an `images/` folder beside it or beside that folder (CVAT's layout).

Masks are label maps: pixel = class id, 0 = background, at the size of their image. `labelled_pairs` lists the data
and opens its first pair on the driver, so that data that is wrong throughout is refused before any Ray work (no
pairs found, a mask of another size than its image, a label above `num_classes`), with the file named.
`read_labelled` gives rows `key`, `image` (uint8, H x W x 3) and `labels` (uint8, H x W) at the model's input size,
plus `error`: a pair that cannot be used is a row with a reason and zero pixels, for the consumer to skip and count.
Shards are streamed (a sample or a batch of rows at a time) and retried by the readers of `pipeline.storage.formats`,
as the job's inputs are; `read_pairs` gives the undecoded rows (`PAIR_SCHEMA`) on the caller's process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from PIL import Image
from pycocotools import mask as coco_mask

from model.processing import prepare_image
from pipeline.storage.formats import is_image_field, parquet_rows, resumable, tables_of, tar_samples
from pipeline.storage.listing import InputError, list_inputs
from pipeline.storage.retry import Retry

PAIR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("mask", pa.binary()),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class LabelledSource:
    """Where labelled pairs are and how they are laid out."""

    uri: str | tuple[str, ...]
    format: str = "auto"  # auto | images | webdataset | parquet
    image_column: str = "image"
    mask_column: str = "mask"
    mask_field: str = "seg.png"
    config_key: str = "data.uri"  # where the user gave `uri`, to name in errors
    classes: tuple[str, ...] | None = None  # the names of class ids 1, 2, ...: how COCO categories become ids

    @property
    def uris(self) -> tuple[str, ...]:
        return (self.uri,) if isinstance(self.uri, str) else self.uri


def labelled_pairs(
    source: LabelledSource, storage_options: dict[str, Any], num_classes: int, *, retry: Retry = Retry()
) -> pa.Table:
    """The work items (key, kind, source, mask_source, annotations) of the labelled data, checked on its first
    pair."""
    coco = [uri for uri in source.uris if uri.lower().endswith(".json")]
    others = tuple(uri for uri in source.uris if uri not in coco)
    parts = [coco_items(uri, source, storage_options) for uri in coco]
    if others:
        parts.append(_listed_items(dataclasses.replace(source, uri=others), storage_options))
    items = pa.concat_tables(parts)
    opened = read_pairs(items.slice(0, 4), source, storage_options, retry=retry)
    first = next((pair for pair in opened if not pair["error"]), None)
    if first is None:
        raise InputError(
            f"{source.config_key}: no labelled pairs (an image with its mask) found in {', '.join(source.uris)}"
        )
    problem = _check_pair(first["image"], first["mask"], num_classes)
    if problem:
        raise InputError(f"{source.config_key}: {first['key']}: {problem}")
    return items


def _listed_items(source: LabelledSource, storage_options: dict[str, Any]) -> pa.Table:
    """The work items of listed files: image and mask pairs, and shards."""
    listing = list_inputs(source, storage_options)
    shards = listing.filter(pc.not_equal(listing["kind"], "images"))
    loose = listing.filter(pc.equal(listing["kind"], "images")).to_pydict()
    sources = dict(zip(loose["key"], loose["source"]))
    try:
        pairs = image_mask_pairs(loose["key"], ".")
    except ValueError as error:
        raise InputError(f"{source.config_key}: {error}") from None
    return pa.table(
        {
            "key": [image for _, image, _ in pairs] + shards["key"].to_pylist(),
            "kind": ["images"] * len(pairs) + shards["kind"].to_pylist(),
            "source": [sources[image] for _, image, _ in pairs] + shards["source"].to_pylist(),
            "mask_source": [sources[mask] for _, _, mask in pairs] + [None] * shards.num_rows,
            "annotations": pa.nulls(len(pairs) + shards.num_rows, pa.string()),
        }
    )


def coco_items(
    uri: str, source: LabelledSource, storage_options: dict[str, Any], *, find_images: bool = True
) -> pa.Table:
    """The work items of a COCO instances JSON: an image each, with its size and annotations (as JSON, each with the
    class id of its category: `coco_label_map` paints them). Without `find_images` the images are not looked for
    (their `source` is null)."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        coco = json.loads(fs.cat_file(path))
        images, annotations, categories = coco["images"], coco.get("annotations", []), coco["categories"]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{source.config_key}: {uri}: not a COCO instances JSON ({type(error).__name__}: {error})"
        ) from None
    if not images:
        raise InputError(f"{source.config_key}: {uri}: a COCO JSON without images")
    if source.classes is None:
        class_of = {c["id"]: c["id"] for c in categories}
    else:
        class_of = {c["id"]: source.classes.index(c["name"]) + 1 for c in categories if c["name"] in source.classes}
    folder = posixpath.dirname(path)
    bases = [folder, f"{folder}/images", f"{posixpath.dirname(folder)}/images"]
    base = next((b for b in bases if fs.exists(f"{b}/{images[0]['file_name']}")), None) if find_images else ""
    if base is None:
        raise InputError(
            f"{source.config_key}: {uri}: the image {images[0]['file_name']} is in none of {', '.join(bases)}"
        )
    by_image: dict[int, list[dict[str, Any]]] = {}
    for annotation in annotations:
        if annotation.get("category_id") in class_of:
            by_image.setdefault(annotation["image_id"], []).append(
                {"class_id": class_of[annotation["category_id"]], "segmentation": annotation["segmentation"]}
            )
    return pa.table(
        {
            "key": [image["file_name"] for image in images],
            "kind": ["coco"] * len(images),
            "source": [
                fs.unstrip_protocol(f"{base}/{image['file_name']}") if find_images else None for image in images
            ],
            "mask_source": pa.nulls(len(images), pa.string()),
            "annotations": [
                json.dumps(
                    {"height": image["height"], "width": image["width"], "regions": by_image.get(image["id"], [])}
                )
                for image in images
            ],
        }
    )


def _coco_pair(item: dict[str, Any], storage_options: dict[str, Any], retry: Retry) -> dict[str, Any]:
    """A COCO image with its annotations painted into a label map (later annotations over earlier ones)."""
    try:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        image = retry(lambda: fs.cat_file(path), item["source"])
        buffer = io.BytesIO()
        Image.fromarray(coco_label_map(item["annotations"])).save(buffer, format="PNG")
        return _pair(item["key"], image, buffer.getvalue())
    except Exception as error:
        return _unreadable(item["key"], error)


def coco_label_map(annotations: str) -> np.ndarray:
    """(H, W) uint8: the label map of a COCO item's `annotations` (`coco_items`), later annotations over earlier
    ones."""
    drawn = json.loads(annotations)
    height, width = drawn["height"], drawn["width"]
    labels = np.zeros((height, width), np.uint8)
    for region in drawn["regions"]:
        segmentation = region["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = {**segmentation, "counts": segmentation["counts"].encode()}
        labels[coco_mask.decode(rle) > 0] = region["class_id"]
    return labels


def read_labelled(
    items: pa.Table,
    source: LabelledSource,
    storage_options: dict[str, Any],
    size: tuple[int, int],
    num_classes: int,
    *,
    num_cpus: float = 0.5,
    retry: Retry = Retry(),
) -> ray.data.Dataset:
    """Rows `key`, `image`, `labels` at `size` = (height, width), and `error` ("" for a usable pair).

    Tasks of `num_cpus=0` (where no CPU is free for them) run at most two at a time."""
    blocks = [items.slice(start, 16) for start in range(0, items.num_rows, 16)]
    limit = {"concurrency": 2} if num_cpus == 0 else {}
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            _read_block,
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=num_cpus,
            **limit,
            fn_kwargs={"source": source, "storage_options": storage_options, "retry": retry},
        )
        .map_batches(
            _decode,
            batch_format="numpy",
            num_cpus=num_cpus,
            **limit,
            fn_kwargs={"size": size, "num_classes": num_classes},
        )
    )


def image_mask_pairs(paths: list[str], folder: str) -> list[tuple[str, str, str]]:
    """(stem relative to `folder`, image path, mask path) for image files `NAME.<ext>` with their masks `NAME.png`
    (`NAME.mask.png` when the image is a PNG); ValueError naming a stem without exactly one image and one mask."""
    by_stem: dict[str, list[str]] = {}
    for path in paths:
        stem, _ = posixpath.splitext(posixpath.relpath(path, folder))
        by_stem.setdefault(stem, []).append(path)
    pairs = []
    for stem, group in sorted(by_stem.items()):
        if stem.endswith(".mask") and stem.removesuffix(".mask") in by_stem:
            continue
        if f"{stem}.mask" in by_stem:
            mask, images = by_stem[f"{stem}.mask"][0], group
        else:
            mask = next((p for p in group if p.lower().endswith(".png")), None)
            images = [p for p in group if p != mask]
        if mask is None or len(images) != 1:
            found = ", ".join(posixpath.basename(p) for p in group)
            raise ValueError(f"{stem!r} needs one image and one PNG mask, found {found}")
        pairs.append((stem, images[0], mask))
    return pairs


def read_pairs(
    items: pa.Table,
    source: LabelledSource,
    storage_options: dict[str, Any],
    *,
    images: bool = True,
    retry: Retry = Retry(),
) -> Iterator[dict[str, Any]]:
    """The `PAIR_SCHEMA` rows of work items (`labelled_pairs`), streamed on the caller's process: shards are read a
    sample or a batch of rows at a time (`pipeline.storage.formats`), re-opened after transient storage errors within
    `retry`'s budget. An unreadable file or shard is one error row, never an exception. Without `images` only the
    masks are read (`image` is empty)."""
    for item in items.to_pylist():
        if item["kind"] == "images":
            yield _loose_pair(item, storage_options, retry)
        elif item["kind"] == "coco":
            yield _coco_pair(item, storage_options, retry)
        else:
            yield from _shard_pairs(item, source, storage_options, images, retry)


def read_shard_masks(
    items: pa.Table, source: LabelledSource, storage_options: dict[str, Any], *, retry: Retry = Retry()
) -> Iterator[dict[str, Any]]:
    """Of the tar and Parquet shards among `items` (`list_inputs` rows), every pair's `key`, `mask` and `error`, as
    `read_labelled` keys them; the image bytes are not read (`image` is empty)."""
    shards = items.filter(pc.not_equal(items["kind"], "images"))
    return read_pairs(shards, source, storage_options, images=False, retry=retry)


def _read_block(
    items: pa.Table, *, source: LabelledSource, storage_options: dict[str, Any], retry: Retry
) -> Iterator[pa.Table]:
    pairs = read_pairs(items, source, storage_options, retry=retry)
    yield from tables_of(pairs, PAIR_SCHEMA, lambda pair: len(pair["image"]) + len(pair["mask"]))


def _loose_pair(item: dict[str, Any], storage_options: dict[str, Any], retry: Retry) -> dict[str, Any]:
    try:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        mask_path = fsspec.core.url_to_fs(item["mask_source"], **storage_options)[1]
        image = retry(lambda: fs.cat_file(path), item["source"])
        return _pair(item["key"], image, retry(lambda: fs.cat_file(mask_path), item["mask_source"]))
    except Exception as error:
        return _unreadable(item["key"], error)


def _shard_pairs(
    item: dict[str, Any], source: LabelledSource, storage_options: dict[str, Any], images: bool, retry: Retry
) -> Iterator[dict[str, Any]]:
    if item["kind"] == "webdataset":
        pairs = partial(_tar_pairs, key=item["key"], mask_field=source.mask_field, images=images)
    else:
        pairs = partial(
            _parquet_pairs,
            key=item["key"],
            image_column=source.image_column if images else None,
            mask_column=source.mask_column,
        )

    def read(done: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
        return pairs(fs, path, done)

    try:
        for _, pair in resumable(read, item["source"], retry):
            yield pair
    except Exception as error:  # a shard that fails for good: one row after the pairs read before
        yield _unreadable(item["key"], error)


def _tar_pairs(
    fs: fsspec.AbstractFileSystem, path: str, done: set[str], *, key: str, mask_field: str, images: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(sample prefix, pair) of each sample with an image member (its first) but those in `done`. Without `images`
    only the mask members are read."""

    def wanted(prefix: str, field: str) -> bool:
        return prefix not in done and (images or field == mask_field)

    for prefix, fields in tar_samples(fs, path, wanted):
        image = next((field for field in fields if is_image_field(field)), None)
        if image is not None and prefix not in done:
            error = None if mask_field in fields else f"no {mask_field} member"
            yield prefix, _pair(f"{key}/{prefix}.{image}", fields[image], fields.get(mask_field), error)


def _parquet_pairs(
    fs: fsspec.AbstractFileSystem, path: str, done: set[str], *, key: str, image_column: str | None, mask_column: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row index, pair) of each row but those in `done`. Without `image_column` only the masks are read."""
    columns = [mask_column] if image_column is None else [image_column, mask_column]
    for row in parquet_rows(fs, path, columns, done):
        image = row.cells[0][0] if image_column else None
        mask = row.cells[-1][0]
        empty = not mask or (image_column and not image)
        yield row.index, _pair(f"{key}/{row.index}", image, mask, "image or mask is empty" if empty else None)


def _unreadable(key: str, error: Exception) -> dict[str, Any]:
    return _pair(key, error=f"unreadable: {type(error).__name__}: {error}")


def _pair(key: str, image: bytes | None = None, mask: bytes | None = None, error: str | None = None) -> dict[str, Any]:
    return {"key": key, "image": image or b"", "mask": mask or b"", "error": error or ""}


def _decode(batch: dict[str, np.ndarray], *, size: tuple[int, int], num_classes: int) -> dict[str, np.ndarray]:
    n = len(batch["key"])
    images = np.zeros((n, *size, 3), np.uint8)
    labels = np.zeros((n, *size), np.uint8)
    errors = np.array([str(error) for error in batch["error"]], dtype=object)
    for i in range(n):
        if not errors[i]:
            errors[i] = _check_pair(batch["image"][i], batch["mask"][i], num_classes) or ""
        if not errors[i]:
            image, mask = _open(batch["image"][i]), _open(batch["mask"][i])
            images[i] = prepare_image(image, size, name=batch["key"][i])
            labels[i] = np.asarray(mask.resize(size[::-1], Image.Resampling.NEAREST))
    return {"key": batch["key"], "image": images, "labels": labels, "error": errors.astype(str)}


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _check_pair(image_bytes: bytes, mask_bytes: bytes, num_classes: int) -> str | None:
    """Why a pair cannot be used, or None."""
    try:
        image, mask = _open(image_bytes), _open(mask_bytes)
    except Exception as error:
        return f"cannot decode: {type(error).__name__}: {error}"
    if mask.mode not in ("L", "P"):
        return f"mask mode {mask.mode}: expected a label map (8-bit grey or palette, pixel = class id)"
    if mask.size != image.size:
        return f"mask is {mask.size[0]}x{mask.size[1]}, its image {image.size[0]}x{image.size[1]}"
    top = int(np.asarray(mask).max())
    if top > num_classes:
        return f"label {top} is outside the classes 0..{num_classes}"
    return None
