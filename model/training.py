"""In-context training pieces, without Ray: random colour mapping, pair batches, and checkpoints `load_model` reads.

A training sample is a pair of images of one task: the prompt (above) with its mask, and the target (below) whose
mask the model paints. Each pair gets its own random colour per class id (the same for both halves), so the model
must read from the prompt which colour means which class; the loss is the model's smooth-L1 on the target half.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from model.processing import normalize
from model.seggpt import SegGpt

_BLACK_BACKGROUND = 0.5  # share of pairs whose background stays black, as the labelling job's palette has it


def random_colours(num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """(num_labels, 3) uint8 colours for class ids 0..num_labels-1, at least 60 apart (RGB distance)."""
    colours: list[np.ndarray] = [np.zeros(3, np.int64)] if rng.random() < _BLACK_BACKGROUND else []
    while len(colours) < num_labels:
        candidate = rng.integers(0, 256, 3)
        if all(np.linalg.norm(candidate - other) >= 60 for other in colours):
            colours.append(candidate)
    return np.stack(colours).astype(np.uint8)


def pair_batch(
    prompt_images: np.ndarray,
    prompt_labels: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """`SegGpt.forward` keyword arguments for pairs: uint8 images (B, H, W, 3) and label maps (B, H, W).

    Every pair gets its own random colour mapping; returns normalised float tensors, (B, 3, H, W) each.
    """
    prompt_masks, masks = np.empty_like(prompt_images), np.empty_like(images)
    for i in range(len(images)):
        colours = random_colours(int(max(prompt_labels[i].max(), labels[i].max())) + 1, rng)
        prompt_masks[i], masks[i] = colours[prompt_labels[i]], colours[labels[i]]

    def tensor(array: np.ndarray) -> torch.Tensor:
        return normalize(torch.from_numpy(np.ascontiguousarray(array)))

    return {
        "pixel_values": tensor(images),
        "prompt_pixel_values": tensor(prompt_images),
        "prompt_masks": tensor(prompt_masks),
        "labels": tensor(masks),
    }


def save_checkpoint(model: SegGpt, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write `config.json` and `model.safetensors` (float32) under `uri`, the layout `load_model` reads."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    weights = {name: value.detach().float().cpu().contiguous() for name, value in model.state_dict().items()}
    fs.pipe_file(f"{path}/model.safetensors", safetensors_bytes(weights))
    fs.pipe_file(f"{path}/config.json", (json.dumps(model.config.to_dict(), indent=2) + "\n").encode())
