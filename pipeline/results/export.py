"""Export a job's labels to what annotation and training tools take.

- `coco`: one COCO instances JSON: a category per class, an annotation per connected region (8-connected) of a class,
  as a compressed RLE (`pycocotools`) with `area` and `bbox`; images by key, with their sizes. CVAT, Label Studio,
  FiftyOne and Detectron2 import it.
- `yolo-seg`: a dataset Ultralytics trains on as written: `images/<split>/<name>.<ext>` (the images, copied or, for
  local sources and target, linked), `labels/<split>/<name>.txt` (a line `class x1 y1 x2 y2 ...` per region,
  normalised to [0, 1]) and `data.yaml` (`path` where the target is local, `train`, `val`, `names`). The split is
  `train` and, with `val_fraction`, `val`: about that share of the keys, by a hash of seed and key. A region's
  polygon is its outer contour (OpenCV), with each hole joined in through a zero-width bridge to its nearest point,
  so that filling the polygon leaves the hole out. YOLO class numbers count the exported classes from 0.
- `masks`: a plain label-map PNG per image (`<name>.png`, pixel = class id, 8-bit; 16-bit above 255 classes).
- `label-studio`: `tasks.json`, Label Studio pre-annotations: a task per image (`data.image`: its URL, see below)
  with one prediction (`model_version`: the row's model, `score`) whose results are its regions as `brushlabels` in
  Label Studio's brush RLE (`brush_rle`), each with its class's score; and `labeling_config.xml`, the project's
  labelling interface (an `Image` and a `BrushLabels` of the exported classes in the job's colours). An image's URL
  is its source (`s3://`, `gs://`, `https://`: Label Studio reads them through its cloud storage), or under
  `local_files_root` Label Studio's local-files URL (`/data/local-files/?d=<path under the root>`). A shard's member
  has no URL of its own: its image is copied to `images/<name>` beside the tasks and addressed the same way.

A file's `<name>` is its key without the image extension (`day/a.jpg` → `day/a`), as training tools pair an image
with its label; a key whose stem another key shares (`a.jpg` and `a.png`) keeps its whole key (`a.jpg`), and the
export says which. `names="key"` names every file by its whole key.

Rows are read from `labels/` a Parquet batch at a time, never the whole table; error rows are skipped and counted.
`lowest` (with `class_name`: by that class's score, among the images that have it) exports only the N ok rows with
the lowest score, the images worth a person's time (the choice `review` makes).
`classes` keeps only those classes (the others become background), `min_area` drops regions smaller than that many
pixels. File names come from `pipeline.storage.output.key_path`, so no key names a place outside the target.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from pycocotools import mask as coco_mask

from model.processing import decode_png
from pipeline.results.label_studio import LabelStudioWriter
from pipeline.results.review import RowChooser
from pipeline.results.writing import ExportError, Region, append_record, copy_spool, image_extension, put_file
from pipeline.storage.formats import read_images
from pipeline.storage.listing import IMAGE_EXTENSION, SHARD_MEMBER_KEY, key_share
from pipeline.storage.output import JOB_FILE, LABELS_DIR, key_path, label_batches, label_rows

FORMATS = ("coco", "yolo-seg", "masks", "label-studio")
NAMES = ("stem", "key")
IMAGES = ("copy", "link")


@dataclass
class ExportSummary:
    target: str
    images: int = 0  # ok rows exported
    skipped: int = 0  # error rows passed over
    regions: int = 0  # COCO annotations / YOLO polygons / regions kept in the masks
    named_by_key: list[str] = field(default_factory=list)  # keys whose stem another key shares

    def __str__(self) -> str:
        clashes = ""
        if self.named_by_key:
            shown = ", ".join(self.named_by_key[:4]) + (", ..." if len(self.named_by_key) > 4 else "")
            clashes = f"; {len(self.named_by_key)} keys share a stem with another key, named by the whole key: {shown}"
        return (
            f"exported {self.images} images ({self.regions} regions) to {self.target}; "
            f"skipped {self.skipped} error rows{clashes}"
        )


def export(
    output_uri: str,
    fmt: str,
    *,
    to: str | None = None,
    classes: list[str] | None = None,
    min_area: int = 0,
    names: str = "stem",
    images: str = "copy",
    val_fraction: float = 0.0,
    seed: int = 0,
    lowest: int | None = None,
    class_name: str | None = None,
    local_files_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    progress_every_s: float = 10.0,
) -> ExportSummary:
    """Write the labels of the job output at `output_uri` as `fmt` under `to` (default `<output_uri>/export/<fmt>`).

    `names`, `images`, `val_fraction` and `seed` shape the files of `yolo-seg` and `masks`, `local_files_root` the
    image URLs of `label-studio`; `lowest` and `class_name` choose the rows (module docstring)."""
    _check_choice("--format", fmt, FORMATS)
    _check_choice("--names", names, NAMES)
    _check_choice("--images", images, IMAGES)
    if not 0 <= val_fraction < 1:
        raise ExportError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(output_uri, **options)
    try:
        job = json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))
    except FileNotFoundError:
        raise ExportError(f"{output_uri}: no {JOB_FILE}: not the output of a labelling job") from None
    class_names = job["classes"]  # background first
    kept = _kept_class_ids(class_names, classes)
    if class_name is not None and class_name not in class_names[1:]:
        raise ExportError(f"--class: {class_name} is not among the job's classes ({', '.join(class_names[1:])})")
    if class_name is not None and not lowest:
        raise ExportError("--class: takes --lowest N (the N lowest-scoring images of that class)")
    target = (to or f"{output_uri.rstrip('/')}/export/{fmt}").rstrip("/")
    summary = ExportSummary(target=target)
    name_of, summary.named_by_key = _file_names(fs, root, "key" if fmt == "coco" else names)  # COCO: by key
    if fmt == "coco":
        writer: CocoWriter | YoloWriter | MaskWriter = CocoWriter(target, class_names, kept, options)
    elif fmt == "masks":
        writer = MaskWriter(target, class_names, name_of, options)
    elif fmt == "label-studio":
        image_column = job.get("config", {}).get("input", {}).get("image_column", "image")
        palette = job.get("palette") or []
        writer = LabelStudioWriter(target, class_names, palette, kept, name_of, local_files_root, image_column, options)
    else:
        image_column = job.get("config", {}).get("input", {}).get("image_column", "image")
        splits = YoloSplits(val_fraction, seed)
        writer = YoloWriter(target, class_names, kept, name_of, images, splits, image_column, options)
    files = sorted(fs.find(f"{root}/{LABELS_DIR}"))
    total = sum(_row_count(fs, path) for path in files)
    last_report = time.monotonic()
    for row in _chosen_rows(fs, root, lowest, None if class_name is None else class_names.index(class_name)):
        if row["status"] != "ok" or row["mask"] is None:
            summary.skipped += 1
            continue
        class_map = decode_png(row["mask"])
        regions = list(_regions(class_map, kept, min_area))
        writer.add(row, class_map.shape, regions)
        summary.images += 1
        summary.regions += len(regions)
        if time.monotonic() - last_report >= progress_every_s:
            last_report = time.monotonic()
            log(f"export: {summary.images + summary.skipped} of {total} rows")
    writer.close()
    return summary


def _chosen_rows(
    fs: fsspec.AbstractFileSystem, root: str, lowest: int | None, class_id: int | None
) -> Iterator[dict[str, Any]]:
    """The rows to export: every row, streamed; with `lowest`, the `lowest` ok rows of lowest score (of `class_id`'s
    score, among rows that have it), in key order, chosen in one pass that keeps only those."""
    columns, optional = ["key", "source", "status", "mask", "score", "model", "class_ids"], ("class_scores",)
    if not lowest:
        yield from label_rows(fs, root, columns, optional)
        return
    chooser = RowChooser(0, lowest, class_id, seed=0)
    for row in label_rows(fs, root, columns, optional):
        if row["status"] == "ok":
            chooser.offer(row)
    yield from sorted(chooser.chosen(), key=lambda row: row["key"])


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExportError(f"{option}: expected one of {' | '.join(choices)}, got {value!r}")


def _file_names(fs: fsspec.AbstractFileSystem, root: str, by: str) -> tuple[Callable[[str], str], list[str]]:
    """How the files of a key are named (`by`: "stem" or "key"), and the keys named by their whole key since another
    ok key has their stem (sorted)."""
    if by == "key":
        return (lambda key: key), []
    ok = [batch["key"].filter(pc.equal(batch["status"], "ok")) for batch in label_batches(fs, root, ["key", "status"])]
    keys = pa.concat_arrays([pa.array([], pa.string()), *ok])
    stems = pc.replace_substring_regex(keys, IMAGE_EXTENSION, "")
    counts = pc.value_counts(stems)
    shared = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    clashing = set(keys.filter(pc.is_in(stems, value_set=shared)).to_pylist())
    return (lambda key: key if key in clashing else _stem(key)), sorted(clashing)


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

    def add(self, row: dict[str, Any], shape: tuple[int, int], regions: list[Region]) -> None:
        key = row["key"]
        self.image_id += 1
        height, width = shape
        append_record(self.images, {"id": self.image_id, "file_name": key, "width": width, "height": height})
        for region in regions:
            rle = coco_mask.encode(np.asfortranarray(region.full(shape), dtype=np.uint8))
            self.annotation_id += 1
            append_record(
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
            copy_spool(self.images, out)
            out.write('], "annotations": [')
            copy_spool(self.annotations, out)
            out.write("]}\n")
        self.images.close()
        self.annotations.close()
        self.spool.cleanup()


@dataclass(frozen=True)
class YoloSplits:
    """Which split a key goes to: `val` for about `val_fraction` of the keys (by a hash of seed and key), else
    `train`."""

    val_fraction: float
    seed: int

    def of(self, key: str) -> str:
        return "val" if self.val_fraction and key_share(key, self.seed) < self.val_fraction else "train"


class YoloWriter:
    """`images/<split>/`, `labels/<split>/` and `data.yaml`. Images of one shard are read from it once, together
    (the rows of a shard are neighbours in `labels/`)."""

    def __init__(
        self,
        target: str,
        names: list[str],
        kept: list[int],
        name_of: Callable[[str], str],
        images: str,
        splits: YoloSplits,
        image_column: str,
        options: dict[str, Any],
    ) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        self.name_of, self.images, self.splits, self.options = name_of, images, splits, options
        self.image_column = image_column
        local = isinstance(self.fs, LocalFileSystem)
        if images == "link" and not local:
            raise ExportError(f"--images link: {target} is not a local folder (use --images copy)")
        self.number = {class_id: number for number, class_id in enumerate(kept)}  # YOLO classes count from 0
        self.pending: list[dict[str, str]] = []  # images still to write: of one source (a file, or a shard)
        self.fs.makedirs(self.root, exist_ok=True)
        data = {
            **({"path": self.root} if local else {}),  # elsewhere Ultralytics takes data.yaml's folder
            "train": "images/train",
            "val": "images/val" if splits.val_fraction else "images/train",
            "names": {number: names[class_id] for class_id, number in self.number.items()},
        }
        self.fs.pipe_file(f"{self.root}/data.yaml", yaml.safe_dump(data, sort_keys=False).encode())

    def add(self, row: dict[str, Any], shape: tuple[int, int], regions: list[Region]) -> None:
        key, source = row["key"], row["source"]
        height, width = shape
        lines = []
        for region in regions:
            outline = _polygon(region)
            if len(outline) < 3:  # a line or a dot: a region YOLO cannot draw
                continue
            points = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in outline)
            lines.append(f"{self.number[region.class_id]} {points}\n")
        split, name = self.splits.of(key), self.name_of(key)
        put_file(self.fs, f"{self.root}/labels/{split}/{key_path(name, '.txt')}", "".join(lines).encode())
        if self.pending and self.pending[0]["source"] != source:
            self._write_images()
        self.pending.append({"key": key, "source": source, "path": f"images/{split}/{key_path(name, '')}"})

    def close(self) -> None:
        self._write_images()

    def _write_images(self) -> None:
        """The pending images, linked or copied to `images/<split>/<name>.<their extension>`."""
        if not self.pending:
            return
        if self.images == "link" and re.match(SHARD_MEMBER_KEY, self.pending[0]["key"]) is None:
            (item,) = self.pending
            path = f"{self.root}/{item['path']}{image_extension(item['key'], None)}"
            self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
            if os.path.lexists(path):  # an earlier export's
                os.remove(path)
            os.symlink(fsspec.core.strip_protocol(item["source"]), path)
        else:  # copied; a shard's members can only be copied
            data = read_images(self.pending, image_column=self.image_column, storage_options=self.options)
            for item in self.pending:
                if item["key"] not in data:
                    raise ExportError(f"{item['source']}: the image of {item['key']} cannot be read")
                path = f"{self.root}/{item['path']}{image_extension(item['key'], data[item['key']])}"
                put_file(self.fs, path, data[item["key"]])
        self.pending = []


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
    return re.sub(IMAGE_EXTENSION, "", key)


class MaskWriter:
    """`<name>.png` per image: the class map with only the kept classes and regions."""

    def __init__(self, target: str, names: list[str], name_of: Callable[[str], str], options: dict[str, Any]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        self.name_of = name_of
        self.dtype = np.uint8 if len(names) <= 256 else np.uint16

    def add(self, row: dict[str, Any], shape: tuple[int, int], regions: list[Region]) -> None:
        label_map = np.zeros(shape, self.dtype)
        for region in regions:
            height, width = region.crop.shape
            label_map[region.y : region.y + height, region.x : region.x + width][region.crop] = region.class_id
        buffer = io.BytesIO()
        Image.fromarray(label_map).save(buffer, format="PNG")
        put_file(self.fs, f"{self.root}/{key_path(self.name_of(row['key']), '.png')}", buffer.getvalue())

    def close(self) -> None:
        pass
