"""Postprocess (stateless CPU tasks): class map at model resolution -> original size, PNG, counts."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from model.processing import encode_png, upsample_class_map


def postprocess(batch: dict[str, np.ndarray], *, palette: np.ndarray, model: str, prompt_set: str) -> dict[str, Any]:
    """`map_batches` function (numpy batches) producing the result rows that `pipeline.write` stores.

    Each ok row's class map is upsampled (nearest) to the original size, encoded as an indexed PNG, and counted.
    """
    n = len(batch["key"])
    ok = batch["status"] == "ok"
    masks: list[bytes | None] = [None] * n
    class_ids: list[list[int]] = [[] for _ in range(n)]
    pixel_counts: list[list[int]] = [[] for _ in range(n)]
    for i in np.flatnonzero(ok):
        full = upsample_class_map(batch["class_map"][i], (int(batch["height"][i]), int(batch["width"][i])))
        masks[i] = encode_png(full, palette)
        counts = np.bincount(full.ravel(), minlength=len(palette))
        class_ids[i] = np.flatnonzero(counts).tolist()
        pixel_counts[i] = counts[counts > 0].tolist()
    return {
        "key": batch["key"],
        "source": batch["source"],
        "status": batch["status"],
        "error": batch["error"],
        "width": np.where(ok, batch["width"], None),
        "height": np.where(ok, batch["height"], None),
        "mask": np.array(masks, dtype=object),
        "class_ids": _object_array(class_ids),
        "pixel_counts": _object_array(pixel_counts),
        "score": np.where(ok, batch["score"], None),
        "model": np.full(n, model, dtype=object),
        "prompt_set": np.full(n, prompt_set, dtype=object),
        "labeled_at": np.full(n, datetime.now(timezone.utc).isoformat(timespec="seconds"), dtype=object),
    }


def _object_array(items: list[list[int]]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array
