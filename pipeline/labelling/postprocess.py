"""Postprocess (stateless CPU tasks): class map at model resolution -> original size, PNG, counts."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from model.processing import encode_png, upsample_class_map, upsampled_class_counts
from pipeline.storage.output import LABELS_SCHEMA, RAN_COLUMNS


def postprocess(batch: dict[str, np.ndarray], *, palette: np.ndarray, model: str, prompt_set: str) -> pa.Table:
    """`map_batches` function (numpy batches in) giving the result rows as a `LABELS_SCHEMA` table.

    Each ok row's class map is upsampled (nearest) to the original size, encoded as an indexed PNG, and counted;
    `class_scores` keeps the infer stage's per-class means of the classes present, aligned with `class_ids`.
    The rows are typed here, where they are made, so that any mix of batches (all ok, all error) joins.
    The infer stage's `RAN_COLUMNS` (what the model ran with) follow the rows to the writer, which counts them.
    """
    n = len(batch["key"])
    ok = batch["status"] == "ok"
    masks: list[bytes | None] = [None] * n
    class_ids: list[list[int]] = [[] for _ in range(n)]
    pixel_counts: list[list[int]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    for i in np.flatnonzero(ok):
        size = (int(batch["height"][i]), int(batch["width"][i]))
        masks[i] = encode_png(upsample_class_map(batch["class_map"][i], size), palette)
        counts = upsampled_class_counts(batch["class_map"][i], size, len(palette))
        class_ids[i] = np.flatnonzero(counts).tolist()
        pixel_counts[i] = counts[counts > 0].tolist()
        scores[i] = batch["class_scores"][i][class_ids[i]].tolist()  # every class at full size is one at model size
    shard_images = np.asarray(batch["shard_images"], dtype=np.int64)
    columns = {
        "key": pa.array(batch["key"].tolist(), pa.string()),
        "source": pa.array(batch["source"].tolist(), pa.string()),
        "status": pa.array(batch["status"].tolist(), pa.string()),
        "error": pa.array([error or None for error in batch["error"].tolist()], pa.string()),
        "width": pa.array(batch["width"], pa.int32(), mask=~ok),
        "height": pa.array(batch["height"], pa.int32(), mask=~ok),
        "mask": pa.array(masks, pa.binary()),
        "mask_uri": pa.nulls(n, pa.string()),
        "class_ids": pa.array(class_ids, pa.list_(pa.int32())),
        "pixel_counts": pa.array(pixel_counts, pa.list_(pa.int64())),
        "class_scores": pa.array(scores, pa.list_(pa.float64())),
        "score": pa.array(batch["score"], pa.float64(), mask=~ok),
        "model": pa.array([model] * n, pa.string()),
        "prompt_set": pa.array([prompt_set] * n, pa.string()),
        "labeled_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "shard_images": pa.array(shard_images, pa.int64(), mask=shard_images == 0),
    }
    table = pa.table(columns, schema=LABELS_SCHEMA)
    for name in RAN_COLUMNS:
        if name in batch:
            table = table.append_column(name, pa.array(batch[name].tolist(), pa.string()))
    return table
