"""Rebuild the demo bundle: `python -m jobs.demo.build` writes images/, prompts/ and checkpoint/ beside this file.

The images are synthetic (discs and squares on textured backgrounds); the checkpoint is a tiny SegGPT with random
weights, so the demo shows the job's machinery, not useful labels, until a trained checkpoint replaces it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from model import SegGpt, SegGptConfig

HERE = Path(__file__).parent
CONFIG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=[448, 224], patch_size=16,
              pretrain_image_size=224, decoder_hidden_size=16, merge_index=1, intermediate_hidden_state_indices=[1, 3])


def scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """An image with a few discs (class 1) and squares (class 2), and its label map."""
    background = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    labels = Image.new("L", (width, height), 0)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for _ in range(rng.integers(2, 5)):
        cls = int(rng.integers(1, 3))
        r = int(rng.integers(min(width, height) // 10, min(width, height) // 4))
        x, y = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        box = (x - r, y - r, x + r, y + r)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if cls == 1 else draw.rectangle)(box, fill=colour)
        (label_draw.ellipse if cls == 1 else label_draw.rectangle)(box, fill=cls)
    return image, labels


def main() -> None:
    rng = np.random.default_rng(0)
    for folder in ("images", "prompts", "checkpoint"):
        (HERE / folder).mkdir(exist_ok=True)
    for i in range(2):
        image, labels = scene(rng, 256, 192)
        image.save(HERE / "prompts" / f"prompt{i}.jpg", quality=90)
        labels.save(HERE / "prompts" / f"prompt{i}.png")
    for i in range(12):
        width, height = int(rng.integers(160, 400)), int(rng.integers(120, 300))
        scene(rng, width, height)[0].save(HERE / "images" / f"sample{i:02d}.jpg", quality=85)
    torch.manual_seed(0)
    model = SegGpt(SegGptConfig(**CONFIG))
    save_file(model.state_dict(), HERE / "checkpoint" / "model.safetensors")
    (HERE / "checkpoint" / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


if __name__ == "__main__":
    main()
