"""What the export writers (`pipeline.results.export`, `pipeline.results.label_studio`) share: a region of a class,
the files they put and spool, and an image's file extension."""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.storage.listing import IMAGE_EXTENSION


class ExportError(ValueError):
    """The export cannot be made: no job output there, classes it does not have, an image it cannot read or address."""


@dataclass(frozen=True)
class Region:
    """One 8-connected component of a class: its pixels within its bounding box, at (x, y) in the image."""

    class_id: int
    x: int
    y: int
    crop: np.ndarray  # (h, w) bool

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) bool: the region in an image of `shape`."""
        mask = np.zeros(shape, bool)
        height, width = self.crop.shape
        mask[self.y : self.y + height, self.x : self.x + width] = self.crop
        return mask


def put_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    fs.pipe_file(path, data)


def image_extension(key: str, data: bytes | None) -> str:
    """The image file extension of a key (`.jpg`), or of its bytes where the key has none (a Parquet row)."""
    found = re.search(IMAGE_EXTENSION, key)
    if found or data is None:
        return found.group(0) if found else ""
    return "." + (Image.open(io.BytesIO(data)).format or "jpeg").lower().replace("jpeg", "jpg")


def append_record(spool: io.TextIOBase, record: dict[str, Any]) -> None:
    spool.write(("," if spool.tell() else "") + json.dumps(record))


def copy_spool(spool: io.TextIOBase, out: io.TextIOBase) -> None:
    spool.seek(0)
    shutil.copyfileobj(spool, out)
