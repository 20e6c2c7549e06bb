"""Intersection over union: the one implementation that `evaluate`, prompt scoring, `select-prompts` and `tune` use.

Counts are kept per image as a (3, C) array: per class, the pixels labelled c in both truth and labels, in either,
and in the truth. Truth pixels equal to the ignore index count nowhere (as in mmsegmentation and torchmetrics). A
dataset's IoU of class c is its intersections summed over the images divided by its unions summed over the images;
its mean IoU is the mean over the foreground classes (ids 1..C-1) whose summed union is not zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOTH, EITHER, TRUTH = 0, 1, 2  # the rows of a (3, C) count array
DEFINITION = (
    "IoU of a class: its pixels in both truth and labels, summed over the images, over its pixels in "
    "either, summed over the images; mean IoU: over the foreground classes whose union is not empty; "
    "pixel accuracy: pixels right over truth pixels; truth pixels equal to the ignore index count nowhere; "
    "an image with truth and no usable label counts its truth pixels as missed"
)


def overlap(truth: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(n, H, W) true and predicted class ids -> (n, 3, C) int64 counts per image (see the module docstring).

    Every id of `labels`, and of `truth` other than `ignore_index`, must be below `num_classes`."""
    n, c = len(truth), num_classes
    truth, labels = truth.reshape(n, -1).astype(np.int64), labels.reshape(n, -1).astype(np.int64)
    keep = np.ones(truth.shape, bool) if ignore_index is None else truth != ignore_index
    image = np.broadcast_to(np.arange(n)[:, None], truth.shape)
    cells = (image * c + truth) * c + labels  # (image, truth, label) flattened
    pairs = np.bincount(cells[keep], minlength=n * c * c).reshape(n, c, c)
    both = np.diagonal(pairs, axis1=1, axis2=2)
    in_truth, in_labels = pairs.sum(2), pairs.sum(1)
    return np.stack([both, in_truth + in_labels - both, in_truth], axis=1)


def missed(truth: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(3, C) counts of an image whose truth has no usable label: every truth pixel missed."""
    pixels = truth.ravel()
    kept = pixels if ignore_index is None else pixels[pixels != ignore_index]
    in_truth = np.bincount(kept.astype(np.int64), minlength=num_classes)
    return np.stack([np.zeros_like(in_truth), in_truth, in_truth])


def class_iou(counts: np.ndarray) -> np.ndarray:
    """(..., 3, C) counts -> (..., C) IoU, NaN where a class is in neither truth nor labels."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts[..., EITHER, :] > 0, counts[..., BOTH, :] / counts[..., EITHER, :], np.nan)


def mean_iou(counts: np.ndarray) -> np.ndarray:
    """(..., 3, C) counts -> (...) mean IoU over the foreground classes that occur (NaN where none does)."""
    foreground = class_iou(counts)[..., 1:]
    occurs = ~np.isnan(foreground)
    total = np.where(occurs, foreground, 0).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(occurs.any(-1), total / occurs.sum(-1), np.nan)


def bootstrap(
    per_image: np.ndarray, *, draws: int = 1000, seed: int = 0, paired: np.ndarray | None = None, level: float = 0.95
) -> tuple[float, float]:
    """The `level` interval of the mean IoU of (n, 3, C) per-image counts over images drawn with replacement; with
    `paired` (counts of another prompt set on the same images), the interval of mean IoU minus `paired`'s."""
    n = len(per_image)
    picks = np.random.default_rng(seed).integers(0, n, (draws, n))
    values = mean_iou(per_image[picks].sum(1))
    if paired is not None:
        values = values - mean_iou(paired[picks].sum(1))
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass
class Evaluation:
    """Labels scored against truth: the summed counts, and per image where they were kept."""

    classes: list[str]  # names of class ids 0..C-1, background first
    counts: np.ndarray  # (3, C) summed over the images scored (compared and missed)
    compared: int = 0  # images with truth and a usable label
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (3, C)
    missing: dict[str, str] = field(default_factory=dict)  # key -> why: truth without a usable label (missed)
    unusable: dict[str, str] = field(default_factory=dict)  # key -> why: truth that cannot be scored (not counted)
    without_truth: int = 0  # ok rows whose key has no truth
    ignore_index: int | None = None
    ignored_pixels: int = 0  # truth pixels equal to the ignore index

    @classmethod
    def of(cls, classes: list[str], per_image: dict[str, np.ndarray], **more: Any) -> Evaluation:
        counts = sum(per_image.values(), np.zeros((3, len(classes)), np.int64))
        return cls(list(classes), counts, per_image=per_image, **more)

    @property
    def iou(self) -> list[float | None]:
        """Per class; None where the class is in neither truth nor labels."""
        return [None if np.isnan(value) else float(value) for value in class_iou(self.counts)]

    @property
    def mean_iou(self) -> float:
        return float(mean_iou(self.counts))

    @property
    def pixel_accuracy(self) -> float:
        truth = self.counts[TRUTH].sum()
        return float(self.counts[BOTH].sum() / truth) if truth else float("nan")

    def interval(self, **options: Any) -> tuple[float, float]:
        """`bootstrap` over the images kept in `per_image` (NaN without images)."""
        if not self.per_image:
            return float("nan"), float("nan")
        return bootstrap(np.stack(list(self.per_image.values())), **options)
