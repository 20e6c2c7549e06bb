"""Score a labelling job's output against ground truth: per-class IoU, mean IoU over foreground classes, pixel
accuracy, and the same per image (`pipeline.results.metrics` holds the arithmetic and its definition).

The truth (local or any fsspec URL) is in any layout of a labelled pool, keyed as the job keys its inputs:
- loose label maps: for key `K`, `STEM.mask.png` (the mask of a PNG image `STEM.png`), `K.png` (as the job writes
  `masks/K.png`), or `STEM.png` (a mask beside its image `STEM.jpg`). A file that is an input image (`STEM.png` beside
  its `STEM.mask.png`, or any non-PNG image) is never read as truth, and an RGB PNG where a label map should be
  makes its image unusable;
- WebDataset `.tar` shards with mask members (`0001.jpg` + `0001.seg.png`: key `shard.tar/0001.jpg`) and Parquet
  shards with a mask column (key `shard.parquet/ROW`), read by `pipeline.storage.pairs`'s reader (masks only; the
  shards' masks are held as PNG bytes while the labels are scored).
Truth is a label map (8-bit or 16-bit grey, palette indices, or 1-bit): pixel = class id, `ignore_index` (255 by
default) for pixels that count nowhere. Truth with another id, or an RGB image, makes its image *unusable*: it is
reported with what was found and scored nowhere. The output's `labels/` is read one file at a time, and of each only
`key`, `status` and `mask`. A key with truth but no usable label (no row, an error row, a mask that cannot be decoded,
has another size than its truth, or ids that are not classes) counts against the score: its truth pixels are missed.
"""

from __future__ import annotations

import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from model.processing import decode_png
from pipeline.results.metrics import DEFINITION, Evaluation, class_iou, mean_iou, missed, overlap
from pipeline.storage.listing import InputError, list_inputs
from pipeline.storage.output import JOB_FILE, LABELS_DIR
from pipeline.storage.pairs import LabelledSource, coco_items, coco_label_map, read_shard_masks

_THREADS = 16
_LABEL_MAP_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


class UnusableTruth(ValueError):
    """Truth that cannot be scored; the message says why."""


class Truth:
    """The truth under a URI, by key: loose label-map files (read when asked for) and shard masks (held as bytes)."""

    def __init__(
        self, uri: str, storage_options: dict[str, Any], *, mask_field: str, mask_column: str, classes: list[str]
    ) -> None:
        source = LabelledSource(
            uri, "auto", mask_column=mask_column, mask_field=mask_field, config_key="--truth", classes=tuple(classes)
        )
        self.coco: dict[str, str] = {}  # a COCO JSON's annotations by file name
        if uri.lower().endswith(".json"):
            items = coco_items(uri, source, storage_options, find_images=False)
            self.coco = dict(zip(items["key"].to_pylist(), items["annotations"].to_pylist()))
            self.fs, self.sources, self.shards = None, {}, {}
            return
        listing = list_inputs(source, storage_options)
        loose = listing.filter(pc.equal(listing["kind"], "images")).to_pydict()
        self.fs = fsspec.core.url_to_fs(uri, **storage_options)[0]
        self.sources = {
            name: source
            for name, source in zip(loose["key"], loose["source"])
            if name.lower().endswith(".png") and not _is_pair_image(name, loose["key"])
        }
        self.shards = {
            row["key"]: row["error"] or row["mask"] for row in read_shard_masks(listing, source, storage_options)
        }

    def names(self) -> set[str]:
        """Every truth: loose files by name, shard masks by key, COCO images by file name."""
        return set(self.sources) | set(self.shards) | set(self.coco)

    def name_of(self, key: str) -> str | None:
        """The truth of the label row `key`, or None."""
        if key in self.shards or key in self.coco:
            return key
        stem = posixpath.splitext(key)[0]
        return next((name for name in (f"{stem}.mask.png", f"{key}.png", f"{stem}.png") if name in self.sources), None)

    def read(self, name: str) -> np.ndarray:
        """The label map of a truth name; UnusableTruth when it is not one."""
        if name in self.coco:
            return coco_label_map(self.coco[name]).astype(np.int64)
        data = self.shards[name] if name in self.shards else self.fs.cat_file(self.sources[name])
        if isinstance(data, str):
            raise UnusableTruth(data)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in _LABEL_MAP_MODES:
                    raise UnusableTruth(f"{image.mode} image, not a label map (pixel = class id)")
                return np.asarray(image).astype(np.int64)
        except UnusableTruth:
            raise
        except Exception as error:
            raise UnusableTruth(f"cannot be decoded: {type(error).__name__}: {error}") from None


def _is_pair_image(name: str, names: list[str]) -> bool:
    """Whether the PNG `name` is the image of a pair (its `STEM.mask.png` is there too)."""
    return f"{posixpath.splitext(name)[0]}.mask.png" in names


def evaluate(
    labels_uri: str,
    truth_uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    classes: list[str] | None = None,
    ignore_index: int | None = 255,
    mask_field: str = "seg.png",
    mask_column: str = "mask",
) -> Evaluation:
    """Compare the output at `labels_uri` with the truth at `truth_uri`. Class names come from the output's
    `_job.json` unless given; `mask_field` and `mask_column` name the masks of WebDataset and Parquet truth."""
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(labels_uri, **options)
    if classes is None:
        if not fs.exists(f"{root}/{JOB_FILE}"):
            raise InputError(f"{labels_uri}: no {JOB_FILE}: not the output of a labelling job")
        classes = json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))["classes"]
    classes = list(classes)
    truth = Truth(truth_uri, options, mask_field=mask_field, mask_column=mask_column, classes=classes[1:])
    scoring = _Scoring(Evaluation(classes, np.zeros((3, len(classes)), np.int64), ignore_index=ignore_index))
    seen: set[str] = set()
    with ThreadPoolExecutor(_THREADS) as pool:
        for path in sorted(fs.find(f"{root}/{LABELS_DIR}")):
            if not path.endswith(".parquet"):
                continue
            with fs.open(path, "rb", cache_type="none") as handle:
                rows = pq.read_table(handle, columns=["key", "status", "mask"]).to_pylist()
            names = [truth.name_of(row["key"]) for row in rows]
            maps = pool.map(lambda name: None if name is None else _read(truth, name), names)
            for row, name, labels in zip(rows, names, maps):
                if name is None:
                    scoring.result.without_truth += row["status"] == "ok"
                    continue
                seen.add(name)
                scoring.score(row, labels)
    for name in sorted(truth.names() - seen):  # truth that no row of the output has
        scoring.score({"key": name, "status": None, "mask": None}, _read(truth, name))
    fs.invalidate_cache()
    return scoring.result


def _read(truth: Truth, name: str) -> np.ndarray | str:
    """The label map, or why it cannot be used."""
    try:
        return truth.read(name)
    except UnusableTruth as error:
        return str(error)


class _Scoring:
    """Adds one image at a time to an `Evaluation`."""

    def __init__(self, result: Evaluation) -> None:
        self.result, self.n = result, len(result.classes)

    def score(self, row: dict[str, Any], truth: np.ndarray | str) -> None:
        key, ignore = row["key"], self.result.ignore_index
        if isinstance(truth, str):
            self.result.unusable[key] = f"truth: {truth}"
            return
        foreign = np.setdiff1d(np.unique(truth), [*range(self.n), *([] if ignore is None else [ignore])])
        if len(foreign):
            allowed = f"classes 0..{self.n - 1}" + ("" if ignore is None else f" nor the ignore index {ignore}")
            self.result.unusable[key] = f"truth ids {foreign.tolist()} are neither {allowed}"
            return
        if ignore is not None:
            self.result.ignored_pixels += int((truth == ignore).sum())
        labels, why = self._labels(row, truth.shape)
        if labels is None:
            counts = missed(truth, self.n, ignore)
            self.result.missing[key] = why
        else:
            counts = overlap(truth[None], labels[None], self.n, ignore)[0]
            self.result.compared += 1
        self.result.counts += counts
        self.result.per_image[key] = counts

    def _labels(self, row: dict[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
        """The row's class map, or None and why it cannot be scored."""
        if row["status"] is None:
            return None, "no row in labels/"
        if row["status"] != "ok" or row["mask"] is None:
            return None, "error row"
        try:
            labels = decode_png(row["mask"]).astype(np.int64)
        except Exception as error:
            return None, f"mask cannot be decoded: {error}"
        if labels.shape != shape:
            return None, f"mask is {labels.shape}, truth {shape}"
        if labels.max(initial=0) >= self.n:
            return None, f"mask has id {labels.max()}, above the classes 0..{self.n - 1}"
        return labels, ""


def report(result: Evaluation) -> dict[str, Any]:
    """The JSON `evaluate` writes: the scores, their definition, and every scored image's IoU per class."""
    return {
        "mean_iou": result.mean_iou,
        "pixel_accuracy": result.pixel_accuracy,
        "iou": dict(zip(result.classes, result.iou)),
        "definition": DEFINITION,
        "ignore_index": result.ignore_index,
        "ignored_pixels": result.ignored_pixels,
        "compared": result.compared,
        "missing": len(result.missing),
        "unusable": len(result.unusable),
        "without_truth": result.without_truth,
        "missing_keys": [f"{key}: {why}" for key, why in list(result.missing.items())[:1000]],
        "unusable_keys": [f"{key}: {why}" for key, why in list(result.unusable.items())[:1000]],
        "images": _images(result, *_per_image(result)),
    }


def _per_image(result: Evaluation) -> tuple[list[str], np.ndarray]:
    """The scored images' keys and their (n, 3, C) counts."""
    keys = list(result.per_image)
    counts = np.stack([result.per_image[key] for key in keys]) if keys else np.zeros((0, 3, len(result.classes)))
    return keys, counts


def _images(result: Evaluation, keys: list[str], counts: np.ndarray) -> list[dict[str, Any]]:
    """Per image: key, status, mean IoU and IoU per class (None where the class is in neither)."""
    return [
        {
            "key": key,
            "status": "missed" if key in result.missing else "compared",
            "mean_iou": _value(mean),
            "iou": {name: _value(value) for name, value in zip(result.classes, row)},
        }
        for key, mean, row in zip(keys, mean_iou(counts), class_iou(counts))
    ]


def _value(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def table(result: Evaluation, *, lowest: int = 5) -> str:
    """Per-class IoU, the summary lines, and the `lowest` images by mean IoU (missed images among them)."""
    lines = [f"{'class':<20}{'IoU':>8}"]
    lines += [
        f"{name:<20}{'-' if value is None else f'{value:.3f}':>8}" for name, value in zip(result.classes, result.iou)
    ]
    ignored = "off" if result.ignore_index is None else f"{result.ignore_index} ({result.ignored_pixels} pixels)"
    lines += [
        f"mean IoU (foreground) {result.mean_iou:.3f}   pixel accuracy {result.pixel_accuracy:.3f}   "
        f"ignore index {ignored}",
        f"images compared {result.compared}, missing {len(result.missing)}, unusable truth "
        f"{len(result.unusable)}, labelled without truth {result.without_truth}",
    ]
    lines += [f"unusable: {key}: {why}" for key, why in list(result.unusable.items())[:lowest]]
    keys, counts = _per_image(result)
    means = mean_iou(counts)
    order = sorted(range(len(keys)), key=lambda i: (bool(np.isnan(means[i])), np.nan_to_num(means[i]), keys[i]))
    worst = _images(result, [keys[i] for i in order[:lowest]], counts[order[:lowest]])
    if lowest and worst:
        width = max(len(image["key"]) for image in worst) + 2
        lines.append(f"lowest {len(worst)} images by mean IoU:")
        lines.append(f"  {'key':<{width}}{'mean IoU':>10}" + "".join(f"{name[:12]:>13}" for name in result.classes[1:]))
        for image in worst:
            cells = [image["iou"][name] for name in result.classes[1:]]
            lines.append(
                f"  {image['key']:<{width}}{_cell(image['mean_iou']):>10}"
                + "".join(f"{_cell(value):>13}" for value in cells)
                + ("   (missed)" if image["status"] == "missed" else "")
            )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
