"""Overlay pictures of a job's labels: each image with its class colours blended in, for a person to look at."""

from __future__ import annotations

import io
import json
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from model.processing import decode_png
from pipeline.read import IMAGE_EXTENSIONS
from pipeline.write import JOB_FILE, LABELS_DIR, key_path

OVERLAYS_DIR = "overlays"


def overlay(image: np.ndarray, class_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: `image` with every pixel of a class other than background blended with its class colour."""
    colours = palette[class_map].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where((class_map > 0)[..., None], blended, image).astype(np.uint8)


def write_overlays(output_uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write `overlays/<key>.jpg` (`pipeline.write.key_path`) for every ok row of loose-file inputs; returns their paths.

    The image is read from the row's `source` and turned as the job turned it (EXIF orientation, the job's
    default); rows from tar or Parquet shards are passed over.
    """
    fs, root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    palette = np.array(json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))["palette"], np.uint8)
    written = []
    for path in sorted(fs.find(f"{root}/{LABELS_DIR}")):
        with fs.open(path, "rb", cache_type="none") as handle:
            rows = pq.read_table(handle, columns=["key", "source", "status", "mask"]).to_pylist()
        for row in rows:
            if row["status"] != "ok" or row["source"].rpartition(".")[2].lower() not in IMAGE_EXTENSIONS:
                continue
            source_fs, source_path = fsspec.core.url_to_fs(row["source"], **(storage_options or {}))
            with Image.open(io.BytesIO(source_fs.cat_file(source_path))) as image:
                pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            picture = overlay(pixels, decode_png(row["mask"]), palette)
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
            target = f"{root}/{OVERLAYS_DIR}/{key_path(row['key'], '.jpg')}"
            fs.makedirs(target.rpartition("/")[0], exist_ok=True)
            fs.pipe_file(target, buffer.getvalue())
            written.append(target)
    return written
