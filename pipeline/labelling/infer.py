"""Inference (an actor pool): each actor loads the model and the encoded prompt set once."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model import load_model
from model.processing import class_scores, masks_to_class_ids, normalize
from model.seggpt import Attention
from pipeline.prompts import PromptSet
from pipeline.storage.output import RAN_COLUMNS
from pipeline.storage.retry import Retry, StorageUnavailable


class SegGptPredictor:
    """`map_batches` callable class. Adds `class_map` (model resolution), `score` and `class_scores`, drops `pixels`,
    and says what made the labels in `RAN_COLUMNS`: the device, dtype and attention backend the model ran with.

    Every image runs with all K prompts of the set as one feature-ensembled group, so a batch of n images is
    n * K model rows. `score` is the mean per-pixel confidence (see `masks_to_class_ids`), `class_scores` (one per
    palette colour) the mean over each class's pixels (`model.processing.class_scores`); NaN on error rows.
    Pixels travel to the device as uint8 (pinned, copied without blocking, on CUDA) and are normalised there.
    The actor's process starts with `model.memory.KEEP_FREED_MEMORY_ENV` (see `build_dataset`): glibc keeps freed
    memory for reuse, sparing a page fault per page of every fresh tensor. A checkpoint that storage cannot give
    within the retry budget fails the first batch, not the constructor: Ray reports a constructor's error only as a
    dead actor, a batch's error whole.
    The prompt set comes by value, not as a reference to the driver's object store: a restarted actor runs its
    constructor again with the arguments it was created with, and a referenced object may be gone by then
    (ray-project/ray#53727).
    """

    def __init__(
        self,
        checkpoint: str,
        prompt_set: PromptSet,
        *,
        dtype: str,
        attention: str,
        storage_options: dict[str, Any],
        retry: Retry,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.failure: StorageUnavailable | None = None
        try:
            self.model = retry(
                lambda: load_model(checkpoint, dtype=dtype, device=self.device, storage_options=storage_options),
                checkpoint,
            )
        except StorageUnavailable as failure:
            self.failure = failure
            return
        self.model.set_attention(attention)
        self.dtype = self.model.pos_embed.dtype
        backend = next(module.backend for module in self.model.modules() if isinstance(module, Attention))
        self.ran = dict(zip(RAN_COLUMNS, (self.device.type, str(self.dtype).removeprefix("torch."), backend)))
        self.prompt_images, self.prompt_masks = (part.to(self.device, self.dtype) for part in prompt_set.tensors())
        self.palette = torch.from_numpy(prompt_set.palette).to(self.device)
        self.embedding = prompt_set.embedding
        self.num_prompts = len(prompt_set.names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failure is not None:
            raise self.failure
        pixels = batch.pop("pixels")
        ok = np.flatnonzero(batch["status"] == "ok")
        class_dtype = np.uint8 if len(self.palette) <= 256 else np.int32
        class_map = np.zeros(pixels.shape[:3], dtype=class_dtype)
        score = np.full(len(pixels), np.nan, dtype=np.float32)
        scores = np.full((len(pixels), len(self.palette)), np.nan, dtype=np.float32)
        if len(ok):
            images = torch.from_numpy(pixels[ok])
            class_map[ok], score[ok], scores[ok] = self._label(
                images.pin_memory() if self.device.type == "cuda" else images
            )
        batch["class_map"] = class_map
        batch["score"] = score
        batch["class_scores"] = scores
        for name, value in self.ran.items():
            batch[name] = np.full(len(pixels), value)
        return batch

    @torch.inference_mode()
    def _label(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, k = len(pixels), self.num_prompts
        images = normalize(pixels.to(self.device, non_blocking=True), self.dtype).repeat_interleave(k, dim=0)
        pred = self.model.predict(
            images,
            self.prompt_images.repeat(n, 1, 1, 1),
            self.prompt_masks.repeat(n, 1, 1, 1),
            num_prompts=k,
            embedding_type=self.embedding,
        )
        ids, confidence = masks_to_class_ids(pred, self.palette)
        per_class = class_scores(ids, confidence, len(self.palette))
        return ids.cpu().numpy(), confidence.mean(dim=(1, 2)).cpu().numpy(), per_class.cpu().numpy()
