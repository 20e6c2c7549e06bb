"""Score a labelling job's output against ground truth: per-class IoU, mean IoU over foreground classes, pixel accuracy.

Ground truth is a folder (local or any fsspec URL) of label-map PNGs (pixel = class id, 0 = background) keyed like the
job's inputs: the truth of key `K` is `K.png` under it (as the job writes `masks/K.png`), or `K` with its extension
replaced by `.png` (an image folder that holds its masks beside the images, as a prompt set does). The output's
`labels/` is read one file at a time, and of each only `key`, `status` and `mask`.

A key with truth but no ok row (missing, an error row, or a mask that cannot be decoded or has another size than its
truth) counts against the score: its truth pixels are counted as missed, and it is reported.
"""

from __future__ import annotations

import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from model.processing import decode_png
from pipeline.write import JOB_FILE, LABELS_DIR

_THREADS = 16


@dataclass
class Evaluation:
    classes: list[str]  # names of class ids 0..C-1, background first
    intersection: np.ndarray  # (C,) pixels labelled c in both
    union: np.ndarray  # (C,) pixels labelled c in either (missed images: their truth pixels)
    truth_pixels: int = 0
    correct_pixels: int = 0
    compared: int = 0  # images with truth and an ok label
    missing: list[str] = field(default_factory=list)  # keys with truth but no usable label, and why
    without_truth: int = 0  # ok rows whose key has no truth

    @property
    def iou(self) -> list[float | None]:
        """Per class; None where the class is in neither truth nor labels."""
        return [float(i / u) if u else None for i, u in zip(self.intersection, self.union)]

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the foreground classes that occur."""
        values = [value for value in self.iou[1:] if value is not None]
        return float(np.mean(values)) if values else float("nan")

    @property
    def pixel_accuracy(self) -> float:
        return self.correct_pixels / self.truth_pixels if self.truth_pixels else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_iou": self.mean_iou, "pixel_accuracy": self.pixel_accuracy,
            "iou": dict(zip(self.classes, self.iou)), "compared": self.compared,
            "missing": len(self.missing), "missing_keys": self.missing[:1000], "without_truth": self.without_truth,
        }

    def table(self) -> str:
        lines = [f"{'class':<20}{'IoU':>8}"]
        lines += [f"{name:<20}{'-' if value is None else f'{value:.3f}':>8}" for name, value in zip(self.classes, self.iou)]
        lines += [f"mean IoU (foreground) {self.mean_iou:.3f}   pixel accuracy {self.pixel_accuracy:.3f}",
                  f"images compared {self.compared}, missing or unusable {len(self.missing)}, "
                  f"labelled without truth {self.without_truth}"]
        return "\n".join(lines)


def evaluate(labels_uri: str, truth_uri: str, *, storage_options: dict[str, Any] | None = None,
             classes: list[str] | None = None) -> Evaluation:
    """Compare the output at `labels_uri` with the truth at `truth_uri`. Class names come from the output's
    `_job.json` unless given."""
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(labels_uri, **options)
    truth_fs, truth_root = fsspec.core.url_to_fs(truth_uri, **options)
    classes = classes or json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))["classes"]
    n = len(classes)
    result = Evaluation(list(classes), np.zeros(n, np.int64), np.zeros(n, np.int64))
    truth_files = {path[len(truth_root):].lstrip("/") for path in truth_fs.find(truth_root) if path.endswith(".png")}
    truth_fs.invalidate_cache()
    seen: set[str] = set()
    with ThreadPoolExecutor(_THREADS) as pool:
        for path in sorted(fs.find(f"{root}/{LABELS_DIR}")):
            if not path.endswith(".parquet"):
                continue
            with fs.open(path, "rb", cache_type="none") as handle:
                rows = pq.read_table(handle, columns=["key", "status", "mask"]).to_pylist()
            truths = pool.map(lambda row: _truth_of(row["key"], truth_files, truth_fs, truth_root), rows)
            for row, (name, truth) in zip(rows, truths):
                if name is None:
                    result.without_truth += row["status"] == "ok"
                    continue
                seen.add(name)
                _score(result, row, truth, n)
    for name in sorted(truth_files - seen):  # truth that no row of the output has
        truth = _read_labels(truth_fs, f"{truth_root}/{name}")
        _miss(result, name, truth, n, "no row in labels/")
    fs.invalidate_cache()
    return result


def _truth_of(key: str, truth_files: set[str], fs: fsspec.AbstractFileSystem, root: str):
    for name in (f"{key}.png", f"{posixpath.splitext(key)[0]}.png"):
        if name in truth_files:
            return name, _read_labels(fs, f"{root}/{name}")
    return None, None


def _read_labels(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    with Image.open(io.BytesIO(fs.cat_file(path))) as image:
        return np.asarray(image.convert("L") if image.mode not in ("L", "P", "I;16", "I") else image).astype(np.int64)


def _score(result: Evaluation, row: dict[str, Any], truth: np.ndarray, n: int) -> None:
    if row["status"] != "ok" or row["mask"] is None:
        return _miss(result, row["key"], truth, n, "error row")
    try:
        labels = decode_png(row["mask"]).astype(np.int64)
    except Exception as error:
        return _miss(result, row["key"], truth, n, f"mask cannot be decoded: {error}")
    if labels.shape != truth.shape:
        return _miss(result, row["key"], truth, n, f"mask is {labels.shape}, truth {truth.shape}")
    truth = truth.clip(0, n - 1)
    pairs = np.bincount((truth * n + labels.clip(0, n - 1)).ravel(), minlength=n * n).reshape(n, n)
    hits = np.diag(pairs)
    result.intersection += hits
    result.union += pairs.sum(0) + pairs.sum(1) - hits
    result.truth_pixels += truth.size
    result.correct_pixels += int(hits.sum())
    result.compared += 1


def _miss(result: Evaluation, key: str, truth: np.ndarray, n: int, why: str) -> None:
    result.union += np.bincount(truth.clip(0, n - 1).ravel(), minlength=n)
    result.truth_pixels += truth.size
    result.missing.append(f"{key}: {why}")
