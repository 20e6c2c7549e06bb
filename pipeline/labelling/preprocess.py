"""Preprocess (stateless CPU tasks): encoded bytes -> uint8 pixels at the model's input size, or an error row."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from model.processing import prepare_image

DEFAULT_MAX_PIXELS = 100_000_000  # input.max_pixels: 300 MB of RGB to decode one image


def preprocess(
    batch: dict[str, np.ndarray],
    *,
    size: tuple[int, int],
    exif_transpose: bool,
    jpeg_draft: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """`map_batches` function (numpy batches): adds `status`, `width`, `height`, `pixels`; drops `bytes`.

    `width`/`height` are those of the image as shown (after EXIF orientation when `exif_transpose`), at full size
    also when `jpeg_draft` has a JPEG decoded at a reduced scale (still at least `size` on each side).
    A row that cannot be decoded gets status "error", a readable message, and zero pixels; so does an image whose
    header declares more than `max_pixels` pixels, before any of it is decoded (a decompression bomb). Every column
    has a fixed numpy dtype (`error` is a string array, "" where there is none), never an object array
    of Nones whose type Ray would have to guess per batch.
    """
    n = len(batch["key"])
    pixels = np.zeros((n, *size, 3), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    errors = np.array([error or "" for error in batch["error"]], dtype=object)
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)
    for i, (key, data) in enumerate(zip(batch["key"], batch["bytes"])):
        if not errors[i]:
            try:
                pixels[i], width[i], height[i] = _decode(data, key, size, exif_transpose, jpeg_draft, max_pixels)
            except Exception as error:  # a bad image must never stop the job
                errors[i] = _describe(error)
        if errors[i]:
            status[i] = "error"
    return {
        "key": batch["key"],
        "source": batch["source"],
        "shard_images": batch["shard_images"],
        "status": status.astype(str),
        "error": errors.astype(str),
        "width": width,
        "height": height,
        "pixels": pixels,
    }


class ImageTooLarge(ValueError):
    """The image's header declares more pixels than `input.max_pixels`."""


def _decode(
    data: bytes | None, key: str, size: tuple[int, int], exif_transpose: bool, jpeg_draft: bool, max_pixels: int
) -> tuple[np.ndarray, int, int]:
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, over input.max_pixels ({max_pixels})")
        if jpeg_draft and image.format == "JPEG":
            side = max(size)  # the orientation may turn the image: ask for the larger side both ways
            image.draft("RGB", (side, side))
        image.load()
        if exif_transpose:
            turned = ImageOps.exif_transpose(image)
            if turned.size != image.size:  # a quarter turn: the image as shown is `height` wide
                width, height = height, width
            image = turned
        return prepare_image(image, size, exif_transpose=False, name=key), width, height


def _describe(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image: cannot identify the image format"
    if isinstance(error, (ImageTooLarge, Image.DecompressionBombError)):
        return f"image too large: {error}"
    return f"cannot decode image: {type(error).__name__}: {error}"
