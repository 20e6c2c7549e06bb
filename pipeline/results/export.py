"""Export a job's labels to what annotation and training tools take.

- `coco`: one COCO instances JSON: a category per class, an annotation per connected region (8-connected) of a class,
  as a compressed RLE (`pycocotools`) with `area` and `bbox`; images by key, with their sizes. CVAT, Label Studio,
  FiftyOne and Detectron2 import it.
- `yolo-seg`: a YOLO segmentation text file per image (`<key without its extension>.txt`: a line `class x1 y1 x2 y2
  ...` per region, normalised to [0, 1]) and a `data.yaml` with the class names. A region's polygon is its outer
  contour (OpenCV), with each hole joined in through a zero-width bridge to its nearest point, so that filling the
  polygon leaves the hole out. YOLO class numbers count the exported classes from 0.
- `masks`: a plain label-map PNG per image (`<key>.png`, pixel = class id, 8-bit; 16-bit above 255 classes).

Rows are read from `labels/` a Parquet batch at a time, never the whole table; error rows are skipped and counted.
`classes` keeps only those classes (the others become background), `min_area` drops regions smaller than that many
pixels. File names come from `pipeline.storage.output.key_path`, so no key names a place outside the target.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image
from pycocotools import mask as coco_mask

from model.processing import decode_png
from pipeline.storage.listing import IMAGE_EXTENSIONS
from pipeline.storage.output import JOB_FILE, LABELS_DIR, key_path, label_rows

FORMATS = ("coco", "yolo-seg", "masks")


class ExportError(ValueError):
    """The export cannot start: no job output there, or classes it does not have."""


@dataclass
class ExportSummary:
    target: str
    images: int = 0  # ok rows exported
    skipped: int = 0  # error rows passed over
    regions: int = 0  # COCO annotations / YOLO polygons / regions kept in the masks

    def __str__(self) -> str:
        return (
            f"exported {self.images} images ({self.regions} regions) to {self.target}; "
            f"skipped {self.skipped} error rows"
        )


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


def export(
    output_uri: str,
    fmt: str,
    *,
    to: str | None = None,
    classes: list[str] | None = None,
    min_area: int = 0,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    progress_every_s: float = 10.0,
) -> ExportSummary:
    """Write the labels of the job output at `output_uri` as `fmt` under `to` (default `<output_uri>/export/<fmt>`)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {' | '.join(FORMATS)}, got {fmt!r}")
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(output_uri, **options)
    try:
        names = json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))["classes"]  # background first
    except FileNotFoundError:
        raise ExportError(f"{output_uri}: no {JOB_FILE}: not the output of a labelling job") from None
    kept = _kept_class_ids(names, classes)
    target = (to or f"{output_uri.rstrip('/')}/export/{fmt}").rstrip("/")
    summary = ExportSummary(target=target)
    writer = {"coco": CocoWriter, "yolo-seg": YoloWriter, "masks": MaskWriter}[fmt](target, names, kept, options)
    files = sorted(fs.find(f"{root}/{LABELS_DIR}"))
    total = sum(_row_count(fs, path) for path in files)
    last_report = time.monotonic()
    for row in label_rows(fs, root, ["key", "status", "mask"]):
        if row["status"] != "ok" or row["mask"] is None:
            summary.skipped += 1
            continue
        class_map = decode_png(row["mask"])
        regions = list(_regions(class_map, kept, min_area))
        writer.add(row["key"], class_map.shape, regions)
        summary.images += 1
        summary.regions += len(regions)
        if time.monotonic() - last_report >= progress_every_s:
            last_report = time.monotonic()
            log(f"export: {summary.images + summary.skipped} of {total} rows")
    writer.close()
    return summary


def _kept_class_ids(names: list[str], classes: list[str] | None) -> list[int]:
    """The class ids to export: all foreground classes, or those named in `classes` (in the job's order)."""
    if classes is None:
        return list(range(1, len(names)))
    unknown = sorted(set(classes) - set(names[1:]))
    if unknown:
        raise ExportError(f"--classes: {', '.join(unknown)} not among the job's classes ({', '.join(names[1:])})")
    return [names.index(name) for name in names[1:] if name in classes]


def _row_count(fs: fsspec.AbstractFileSystem, path: str) -> int:
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _regions(class_map: np.ndarray, kept: list[int], min_area: int) -> Iterator[Region]:
    """The 8-connected regions of each kept class, of at least `min_area` pixels, in class then scan order."""
    for class_id in kept:
        binary = (class_map == class_id).astype(np.uint8)
        if not binary.any():
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for label in range(1, count):
            x, y, width, height, area = stats[label]
            if area >= min_area:
                yield Region(class_id, int(x), int(y), components[y : y + height, x : x + width] == label)


class CocoWriter:
    """One COCO instances JSON; images and annotations are spooled to local files, then joined into the target."""

    def __init__(self, target: str, names: list[str], kept: list[int], options: dict[str, Any]) -> None:
        self.target, self.options = f"{target}/instances.json", options
        self.categories = [{"id": class_id, "name": names[class_id], "supercategory": ""} for class_id in kept]
        self.spool = tempfile.TemporaryDirectory(prefix="seggpt-coco-")
        self.images = open(f"{self.spool.name}/images", "w+")
        self.annotations = open(f"{self.spool.name}/annotations", "w+")
        self.image_id = self.annotation_id = 0

    def add(self, key: str, shape: tuple[int, int], regions: list[Region]) -> None:
        self.image_id += 1
        height, width = shape
        _append(self.images, {"id": self.image_id, "file_name": key, "width": width, "height": height})
        for region in regions:
            rle = coco_mask.encode(np.asfortranarray(region.full(shape), dtype=np.uint8))
            self.annotation_id += 1
            _append(
                self.annotations,
                {
                    "id": self.annotation_id,
                    "image_id": self.image_id,
                    "category_id": region.class_id,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(coco_mask.area(rle)),
                    "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                    "iscrowd": 0,
                },
            )

    def close(self) -> None:
        head = {"info": {"description": "seggpt-autolabel export"}, "licenses": [], "categories": self.categories}
        with fsspec.open(self.target, "w", auto_mkdir=True, **self.options) as out:
            out.write(json.dumps(head)[:-1] + ', "images": [')
            _copy(self.images, out)
            out.write('], "annotations": [')
            _copy(self.annotations, out)
            out.write("]}\n")
        self.images.close()
        self.annotations.close()
        self.spool.cleanup()


def _append(spool: io.TextIOBase, record: dict[str, Any]) -> None:
    spool.write(("," if spool.tell() else "") + json.dumps(record))


def _copy(spool: io.TextIOBase, out: io.TextIOBase) -> None:
    spool.seek(0)
    shutil.copyfileobj(spool, out)


class YoloWriter:
    """`labels/<key stem>.txt` per image and `data.yaml`."""

    def __init__(self, target: str, names: list[str], kept: list[int], options: dict[str, Any]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        self.number = {class_id: number for number, class_id in enumerate(kept)}  # YOLO classes count from 0
        self.fs.makedirs(self.root, exist_ok=True)
        data = {
            "path": ".",
            "nc": len(kept),
            "names": {number: names[class_id] for class_id, number in self.number.items()},
        }
        self.fs.pipe_file(f"{self.root}/data.yaml", yaml.safe_dump(data, sort_keys=False).encode())

    def add(self, key: str, shape: tuple[int, int], regions: list[Region]) -> None:
        height, width = shape
        lines = []
        for region in regions:
            outline = _polygon(region)
            if len(outline) < 3:  # a line or a dot: a region YOLO cannot draw
                continue
            points = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in outline)
            lines.append(f"{self.number[region.class_id]} {points}\n")
        path = f"{self.root}/labels/{key_path(_stem(key), '.txt')}"
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        self.fs.pipe_file(path, "".join(lines).encode())

    def close(self) -> None:
        pass


def _polygon(region: Region) -> np.ndarray:
    """(N, 2) integer x, y: the region's outer contour with its holes bridged in."""
    contours, hierarchy = cv2.findContours(
        region.crop.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(region.x, region.y)
    )
    parents = hierarchy[0, :, 3]  # -1: an outer contour; else the outer contour a hole is in
    outer = max(np.flatnonzero(parents == -1), key=lambda i: cv2.contourArea(contours[i]))
    polygon = contours[outer].reshape(-1, 2)
    for hole in np.flatnonzero(parents == outer):
        polygon = _bridge(polygon, contours[hole].reshape(-1, 2))
    return polygon


def _bridge(polygon: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One polygon that goes round `polygon`, along to the nearest point of `hole`, round it and back."""
    distances = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(-1)  # (P, H)
    i, j = np.unravel_index(distances.argmin(), distances.shape)
    return np.concatenate([polygon[: i + 1], hole[j:], hole[: j + 1], polygon[i:]])


def _stem(key: str) -> str:
    """The key without its image extension (YOLO pairs `x/a.jpg` with `x/a.txt`)."""
    base, dot, extension = key.rpartition(".")
    return base if dot and "/" not in extension and extension.lower() in IMAGE_EXTENSIONS else key


class MaskWriter:
    """`<key>.png` per image: the class map with only the kept classes and regions."""

    def __init__(self, target: str, names: list[str], kept: list[int], options: dict[str, Any]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        self.dtype = np.uint8 if len(names) <= 256 else np.uint16

    def add(self, key: str, shape: tuple[int, int], regions: list[Region]) -> None:
        label_map = np.zeros(shape, self.dtype)
        for region in regions:
            height, width = region.crop.shape
            label_map[region.y : region.y + height, region.x : region.x + width][region.crop] = region.class_id
        buffer = io.BytesIO()
        Image.fromarray(label_map).save(buffer, format="PNG")
        path = f"{self.root}/{key_path(key, '.png')}"
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        self.fs.pipe_file(path, buffer.getvalue())

    def close(self) -> None:
        pass
