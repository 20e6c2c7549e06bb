"""Prompt sets scored on labelled images through the model, on Ray: what `select-prompts` and `tune` measure.

A labelled pool (`pipeline.storage.pairs`) is split by a hash of each key and a seed, so a key lands on the same side in
every run and in both commands; its rows stay in Ray's object store as blocks, and long-lived actors that hold the
model score one block per call, so that the many passes of a greedy choice load the model once. A *prompt set* is a
list of indices into an array of prompts (normalised (P, 3, H, W) image and mask tensors); each image is labelled
with the whole set as one feature-ensembled group, as the labelling job does (`model.predict` with `num_prompts`),
and compared with its label map at the model's input size. The result is an `Evaluation` per set: the counts of
`pipeline.results.metrics.overlap` per validation image, so that a score comes with its spread over the images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import ray.data
import torch

from model import load_model
from model.processing import build_palette, masks_to_class_ids, normalize
from pipeline.results import Evaluation, overlap
from pipeline.storage.listing import key_share


def validation_bound(keys: list[str], fraction: float, seed: int) -> float:
    """The share below which a key is held out: exactly round(fraction * len(keys)) keys are (at least 1, and at most
    all but one), the keys of smallest hash share; the same keys in every run over the same pool."""
    shares = np.sort([key_share(key, seed) for key in keys])
    count = min(max(round(fraction * len(shares)), 1), len(shares) - 1)
    return float(shares[count]) if count > 0 else 0.0


def in_validation(keys: np.ndarray, bound: float, seed: int) -> np.ndarray:
    """bool per key: whether it belongs to the validation part (its hash share below `validation_bound`'s)."""
    return np.array([key_share(str(key), seed) < bound for key in keys], dtype=bool)


def split_rows(rows: ray.data.Dataset, fraction: float, seed: int, num_labels: int) -> ray.data.Dataset:
    """`read_labelled` rows (materialized: their keys are read first) plus `validation` (bool: `fraction` of the keys,
    by `validation_bound`) and `present` (uint8 (num_labels,): 1 where a class occurs)."""
    keys = [row["key"] for row in rows.select_columns(["key"]).iter_rows()]
    bound = validation_bound(keys, fraction, seed)
    return rows.map_batches(
        _split,
        batch_size=None,
        batch_format="numpy",
        num_cpus=0.5,
        fn_kwargs={"bound": bound, "seed": seed, "num_labels": num_labels},
    )


def _split(batch: dict[str, np.ndarray], *, bound: float, seed: int, num_labels: int) -> dict[str, np.ndarray]:
    labels = batch["labels"].reshape(len(batch["key"]), -1)
    batch["validation"] = in_validation(batch["key"], bound, seed)
    batch["present"] = (
        np.stack([np.bincount(row, minlength=num_labels)[:num_labels] > 0 for row in labels]).astype(np.uint8)
        if len(labels)
        else np.zeros((0, num_labels), np.uint8)
    )
    return batch


def scores(evaluation: Evaluation) -> dict[str, Any]:
    """A set's score as the reports write it: mean IoU, its 95% bootstrap interval over the images, IoU per class
    (None where it is in neither), images."""
    return {
        "mean_iou": evaluation.mean_iou,
        "interval": list(evaluation.interval()),
        "iou": dict(zip(evaluation.classes[1:], evaluation.iou[1:])),
        "images": evaluation.compared,
    }


def prompt_tensors(images: np.ndarray, labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (P, H, W, 3) and label maps (P, H, W) -> normalised float32 (P, 3, H, W) image and mask arrays,
    the mask painted with the class palette (what the labelling job makes of a prompt folder of these)."""
    painted = build_palette(num_labels - 1)[labels]
    return (
        normalize(torch.from_numpy(np.ascontiguousarray(images))).numpy(),
        normalize(torch.from_numpy(np.ascontiguousarray(painted))).numpy(),
    )


class PromptScorer:
    """Ray actors (one CPU, or one GPU where the cluster has them) that hold the model and an array of prompts, and
    score prompt sets on blocks of `split_rows` rows: the training or the validation part, usable rows only."""

    def __init__(
        self,
        checkpoint: str,
        prompts: tuple[np.ndarray, np.ndarray],
        *,
        classes: tuple[str, ...],
        embedding: str,
        storage_options: dict[str, Any],
        actors: int = 1,
    ) -> None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        actor = ray.remote(_Scorer).options(num_cpus=1, num_gpus=gpus)
        shared = ray.put(prompts)
        self.classes = ("background", *classes)
        self.actors = [
            actor.remote(
                checkpoint,
                shared,
                num_labels=len(self.classes),
                embedding=embedding,
                dtype="bfloat16" if gpus else "float32",
                storage_options=storage_options,
            )
            for _ in range(actors)
        ]

    def score(self, blocks: list[ray.ObjectRef], sets: list[list[int]], *, validation: bool) -> list[Evaluation]:
        """One `Evaluation` per set (a list of prompt indices) over the usable rows of `blocks` in that part."""
        results = ray.get(
            [self.actors[i % len(self.actors)].score.remote(block, sets, validation) for i, block in enumerate(blocks)]
        )
        keys = np.concatenate([keys for keys, _ in results])
        counts = np.concatenate([counts for _, counts in results], axis=1)  # (S, images, 3, C)
        order = np.argsort(keys, kind="stable")  # blocks come in no fixed order
        return [
            Evaluation.of(list(self.classes), dict(zip(keys[order].tolist(), per_set[order])), compared=len(keys))
            for per_set in counts
        ]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class _Scorer:
    def __init__(
        self,
        checkpoint: str,
        prompts: tuple[np.ndarray, np.ndarray],
        *,
        num_labels: int,
        embedding: str,
        dtype: str,
        storage_options: dict[str, Any],
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(checkpoint, dtype=dtype, device=self.device, storage_options=storage_options)
        self.dtype = self.model.pos_embed.dtype
        self.prompt_images, self.prompt_masks = (
            torch.tensor(part, device=self.device, dtype=self.dtype) for part in prompts
        )
        self.num_labels, self.embedding = num_labels, embedding
        self.palette = torch.from_numpy(build_palette(num_labels - 1)).to(self.device)

    @torch.inference_mode()
    def score(
        self, block: dict[str, np.ndarray], sets: list[list[int]], validation: bool, batch_size: int = 8
    ) -> tuple[np.ndarray, np.ndarray]:
        """The keys of the usable rows in that part, and their `overlap` counts per set: (S, rows, 3, C)."""
        rows = np.flatnonzero((block["error"] == "") & (block["validation"] == validation))
        counts = np.zeros((len(sets), len(rows), 3, self.num_labels), np.int64)
        for start in range(0, len(rows), batch_size):
            chosen = rows[start : start + batch_size]
            n = len(chosen)
            pixels = normalize(torch.from_numpy(block["image"][chosen]).to(self.device), self.dtype)
            truth = block["labels"][chosen]
            for s, members in enumerate(sets):
                k = len(members)
                pred = self.model.predict(
                    pixels.repeat_interleave(k, dim=0),
                    self.prompt_images[members].repeat(n, 1, 1, 1),
                    self.prompt_masks[members].repeat(n, 1, 1, 1),
                    num_prompts=k,
                    embedding_type=self.embedding,
                )
                ids, _ = masks_to_class_ids(pred, self.palette)
                counts[s, start : start + n] = overlap(truth, ids.cpu().numpy(), self.num_labels)
        return block["key"][rows].astype(str), counts
