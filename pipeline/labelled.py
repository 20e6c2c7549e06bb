"""Labelled data: pairs of an image and its class-id mask, from the job's three input formats, on Ray Data.

- **images**: loose files, each image `NAME.<ext>` with its mask `NAME.png` beside it (`NAME.mask.png` when the image
  is a PNG itself), as in a prompt set;
- **webdataset**: `.tar` shards whose samples hold an image member and a mask member of the same basename prefix,
  the mask's field being `mask_field` (`0001.jpg` + `0001.seg.png`);
- **parquet**: shards with the image in `image_column` and the mask in `mask_column` (bytes, or the Hugging Face
  `{bytes, path}` struct).

Masks are label maps: pixel = class id, 0 = background, at the size of their image. `labelled_pairs` lists the data
and opens its first pair on the driver, so that data that is wrong throughout is refused before any Ray work (no
pairs found, a mask of another size than its image, a label above `num_classes`), with the file named.
`read_labelled` gives rows `key`, `image` (uint8, H x W x 3) and `labels` (uint8, H x W) at the model's input size,
plus `error`: a pair that cannot be used is a row with a reason and zero pixels, for the consumer to skip and count.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from model.processing import prepare_image
from pipeline.prompts import image_mask_pairs
from pipeline.read import IMAGE_EXTENSIONS, InputError, list_inputs

PAIR_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("image", pa.binary()), pa.field("mask", pa.binary()),
                         pa.field("error", pa.string())])


@dataclass(frozen=True)
class LabelledSource:
    """Where labelled pairs are and how they are laid out."""

    uri: str | tuple[str, ...]
    format: str = "auto"  # auto | images | webdataset | parquet
    image_column: str = "image"
    mask_column: str = "mask"
    mask_field: str = "seg.png"

    @property
    def uris(self) -> tuple[str, ...]:
        return (self.uri,) if isinstance(self.uri, str) else self.uri


def labelled_pairs(source: LabelledSource, storage_options: dict[str, Any], num_classes: int) -> pa.Table:
    """The work items (key, kind, source, mask_source) of the labelled data, checked on its first pair."""
    listing = list_inputs(source, storage_options)
    shards = listing.filter(pc.not_equal(listing["kind"], "images"))
    loose = listing.filter(pc.equal(listing["kind"], "images")).to_pydict()
    sources = dict(zip(loose["key"], loose["source"]))
    try:
        pairs = image_mask_pairs(loose["key"], ".")
    except ValueError as error:
        raise InputError(f"input.uri: {error}") from None
    items = pa.table({
        "key": [image for _, image, _ in pairs] + shards["key"].to_pylist(),
        "kind": ["images"] * len(pairs) + shards["kind"].to_pylist(),
        "source": [sources[image] for _, image, _ in pairs] + shards["source"].to_pylist(),
        "mask_source": [sources[mask] for _, _, mask in pairs] + [None] * shards.num_rows,
    })
    first = next((row for row in _read_items(items.slice(0, 4), source, storage_options) if not row["error"]), None)
    if first is None:
        raise InputError(f"input.uri: no labelled pairs (an image with its mask) found in {', '.join(source.uris)}")
    problem = _check_pair(first["image"], first["mask"], num_classes)
    if problem:
        raise InputError(f"input.uri: {first['key']}: {problem}")
    return items


def read_labelled(items: pa.Table, source: LabelledSource, storage_options: dict[str, Any],
                  size: tuple[int, int], num_classes: int, *, num_cpus: float = 0.5) -> ray.data.Dataset:
    """Rows `key`, `image`, `labels` at `size` = (height, width), and `error` ("" for a usable pair).

    Tasks of `num_cpus=0` (where no CPU is free for them) run at most two at a time."""
    blocks = [items.slice(start, 16) for start in range(0, items.num_rows, 16)]
    limit = {"concurrency": 2} if num_cpus == 0 else {}
    return ray.data.from_arrow(blocks).map_batches(
        _read_block, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus, **limit,
        fn_kwargs={"source": source, "storage_options": storage_options},
    ).map_batches(
        _decode, batch_format="numpy", num_cpus=num_cpus, **limit,
        fn_kwargs={"size": size, "num_classes": num_classes},
    )


def _read_block(items: pa.Table, *, source: LabelledSource, storage_options: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(_read_items(items, source, storage_options)), schema=PAIR_SCHEMA)


def read_shard_masks(items: pa.Table, source: LabelledSource,
                     storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Of the tar and Parquet shards among `items` (`list_inputs` rows), every pair's `key`, `mask` and `error`, as
    `read_labelled` keys them; the image bytes are not read (`image` is empty)."""
    shards = items.filter(pc.not_equal(items["kind"], "images"))
    return _read_items(shards, source, storage_options, images=False)


def _read_items(items: pa.Table, source: LabelledSource, storage_options: dict[str, Any], *,
                images: bool = True) -> Iterator[dict[str, Any]]:
    for item in items.to_pylist():
        try:
            fs, path = fsspec.core.url_to_fs(item["source"], **storage_options)
            if item["kind"] == "images":
                mask_path = fsspec.core.url_to_fs(item["mask_source"], **storage_options)[1]
                yield _pair(item["key"], fs.cat_file(path), fs.cat_file(mask_path))
            elif item["kind"] == "webdataset":
                yield from _tar_pairs(fs, path, item["key"], source.mask_field, images)
            else:
                yield from _parquet_pairs(fs, path, item["key"], source.image_column if images else None,
                                          source.mask_column)
        except Exception as error:  # an unreadable file or shard: one row, never a crash
            yield _pair(item["key"], error=f"unreadable: {type(error).__name__}: {error}")


def _tar_pairs(fs: fsspec.AbstractFileSystem, path: str, key: str, mask_field: str,
               images: bool = True) -> Iterator[dict[str, Any]]:
    """A sample's members are adjacent (the WebDataset convention): pair them as the prefix changes. Without
    `images` only the mask members are read."""
    sample: dict[str, bytes] = {}
    prefix = None
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = posixpath.normpath(info.name).lstrip("/")
            folder, _, base = name.rpartition("/")
            stem, _, field = base.partition(".")
            if f"{folder}/{stem}" != prefix:
                yield from _sample_pair(key, prefix, sample, mask_field)
                prefix, sample = f"{folder}/{stem}", {}
            sample[field] = tar.extractfile(info).read() if images or field == mask_field else b""
    yield from _sample_pair(key, prefix, sample, mask_field)


def _sample_pair(key: str, prefix: str | None, sample: dict[str, bytes], mask_field: str) -> Iterator[dict[str, Any]]:
    images = [field for field in sample if field.lower() in IMAGE_EXTENSIONS]
    if prefix is not None and images:
        name = f"{prefix.lstrip('/')}.{images[0]}"
        yield _pair(f"{key}/{name}", sample[images[0]], sample.get(mask_field),
                    None if mask_field in sample else f"no {mask_field} member")


def _parquet_pairs(fs: fsspec.AbstractFileSystem, path: str, key: str, image_column: str | None,
                   mask_column: str) -> Iterator[dict[str, Any]]:
    """Without `image_column` only the masks are read."""
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=[name for name in (image_column, mask_column) if name])
    masks = map(_bytes_of, table[mask_column].to_pylist())
    images = map(_bytes_of, table[image_column].to_pylist()) if image_column else repeat(None)
    for row, (image, mask) in enumerate(zip(images, masks)):
        empty = not mask or (image_column and not image)
        yield _pair(f"{key}/{row}", image, mask, "image or mask is empty" if empty else None)


def _bytes_of(value: Any) -> bytes | None:
    return value.get("bytes") if isinstance(value, dict) else value


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
