"""Rebuild the demo bundle: `python -m jobs.demo.build [--checkpoint DIR]` writes images/, truth/, prompts/ and
classes.json beside this file, and copies a trained checkpoint (`config.json` + `model.safetensors`) into checkpoint/.

The sample is one synthetic task (`pipeline.training.synthetic`) drawn from a seed that training never uses: two
prompts and twelve images of its two classes, with the label maps of the images as ground truth (`truth/<name>.png`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.training.synthetic import random_task, render

HERE = Path(__file__).parent
SEED = 20_261_126  # a stream of its own: training draws from default_rng([data seed, step, rank])


def write_sample(root: Path, seed: int, images: int = 12) -> list[str]:
    """A task of two classes drawn from `seed`: prompts/ (two image + mask pairs), images/ and truth/ (their label
    maps) under `root`; returns the class names (the shapes of the task's classes)."""
    rng = np.random.default_rng(seed)
    task = random_task(rng, num_classes=2)
    for folder in ("images", "prompts", "truth"):
        shutil.rmtree(root / folder, ignore_errors=True)
        (root / folder).mkdir(parents=True)
    for i in range(2):
        image, labels = render(task, rng, (192, 256))
        Image.fromarray(image).save(root / "prompts" / f"prompt{i}.jpg", quality=90)
        Image.fromarray(labels).save(root / "prompts" / f"prompt{i}.png")
    for i in range(images):
        size = (int(rng.integers(120, 300)), int(rng.integers(160, 400)))
        image, labels = render(task, rng, size)
        Image.fromarray(image).save(root / "images" / f"sample{i:02d}.jpg", quality=90)
        Image.fromarray(labels).save(root / "truth" / f"sample{i:02d}.png")
    return [look.shape for look in task.classes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="a trained checkpoint folder to bundle (config.json + model.safetensors)")
    args = parser.parse_args()
    classes = write_sample(HERE, SEED)
    (HERE / "classes.json").write_text(json.dumps(classes) + "\n")
    print("classes:", classes)
    if args.checkpoint:
        (HERE / "checkpoint").mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(args.checkpoint) / name, HERE / "checkpoint" / name)


if __name__ == "__main__":
    main()
