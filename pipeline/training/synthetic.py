"""Synthetic in-context segmentation tasks, for training the bundled model and for tests.

A *task* gives each of its classes an appearance: a shape (disc, box, triangle, ring or bar), a colour and a
texture (flat, noisy or striped), and a size range. Every image of a task draws several instances of some of its
classes at random places and sizes, over a noisy background of the task's own colour with clutter of colours no
class uses; later shapes cover earlier ones, so regions overlap. A model that labels one image of a task from
another (its prompt) must read what each class looks like from the prompt: the appearances, and the colours the
prompt's mask gives the classes, change from task to task.

Images and label maps are uint8 numpy arrays, (H, W, 3) and (H, W); label 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "box", "triangle", "ring", "bar")
TEXTURES = ("flat", "noise", "stripes")


@dataclass(frozen=True)
class ClassLook:
    shape: str
    colour: tuple[int, int, int]
    texture: str
    size: tuple[float, float]  # radius range, as a share of the image's shorter side


@dataclass(frozen=True)
class Task:
    classes: tuple[ClassLook, ...]  # class ids 1..N
    background: tuple[int, int, int]
    clutter: tuple[int, int, int]


def random_task(rng: np.random.Generator, num_classes: int | None = None) -> Task:
    """A task of 1..3 classes (or `num_classes`) with distinct shapes and well-separated colours."""
    n = int(num_classes or rng.integers(1, 4))
    colours = _distinct_colours(rng, n + 2)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    looks = tuple(
        ClassLook(
            shape=str(shapes[i]),
            colour=colours[i],
            texture=str(rng.choice(TEXTURES)),
            size=(float(low), float(low * rng.uniform(1.3, 2.0))),
        )
        for i, low in enumerate(rng.uniform(0.10, 0.18, size=n))
    )
    return Task(classes=looks, background=colours[n], clutter=colours[n + 1])


def render(
    task: Task, rng: np.random.Generator, size: tuple[int, int], *, presence: float | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One image of `task` at `size` = (height, width) and its label map. Each class appears with probability
    `presence`; by default always when the task has at most three classes, else with probability 0.8. `scale`
    multiplies the classes' sizes."""
    height, width = size
    image = np.clip(np.array(task.background) + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((height, width), np.uint8)
    canvas = Image.fromarray(image)
    for _ in range(int(rng.integers(0, 3))):  # clutter: small blobs of a colour no class has
        _draw(canvas, None, ClassLook("disc", task.clutter, "noise", (0.04, 0.08)), 0, rng)
    if presence is None:
        presence = 1.0 if len(task.classes) <= 3 else 0.8
    present = [i for i in range(len(task.classes)) if presence >= 1.0 or rng.random() < presence]
    instances = [i for i in present for _ in range(int(rng.integers(1, 3)))]
    label_canvas = Image.fromarray(labels)
    for i in rng.permutation(instances):
        _draw(canvas, label_canvas, task.classes[i], int(i) + 1, rng, scale)
    return np.asarray(canvas), np.asarray(label_canvas)


def task_pair(rng: np.random.Generator, size: tuple[int, int], num_classes: int | None = None):
    """Two images of one fresh task: (prompt image, prompt labels, image, labels)."""
    task = random_task(rng, num_classes)
    return (*render(task, rng, size), *render(task, rng, size))


def _draw(
    canvas: Image.Image,
    labels: Image.Image | None,
    look: ClassLook,
    label: int,
    rng: np.random.Generator,
    scale: float = 1.0,
) -> None:
    width, height = canvas.size
    radius = max(2, int(min(width, height) * rng.uniform(*look.size) * scale))
    x, y = (int(rng.integers(radius // 2, side - radius // 2)) for side in (width, height))
    box = (x - radius, y - radius, x + radius, y + radius)
    mask = Image.new("L", canvas.size, 0)
    pen = ImageDraw.Draw(mask)
    if look.shape == "disc":
        pen.ellipse(box, fill=255)
    elif look.shape == "box":
        pen.rectangle(box, fill=255)
    elif look.shape == "triangle":
        pen.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=255)
    elif look.shape == "ring":
        pen.ellipse(box, fill=255)
        inner = radius // 2
        pen.ellipse((x - inner, y - inner, x + inner, y + inner), fill=0)
    else:  # bar: long and thin, horizontal or vertical
        thin = max(2, radius // 3)
        pen.rectangle(
            (x - radius, y - thin, x + radius, y + thin)
            if rng.random() < 0.5
            else (x - thin, y - radius, x + thin, y + radius),
            fill=255,
        )
    canvas.paste(Image.fromarray(_texture(look, rng, (height, width))), (0, 0), mask)
    if labels is not None:
        labels.paste(label, (0, 0), mask)


def _texture(look: ClassLook, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    colour = np.array(look.colour, np.float32) + rng.normal(0, 8, 3)  # a little jitter per instance
    fill = np.broadcast_to(colour, (*size, 3)).copy()
    if look.texture == "noise":
        fill += rng.normal(0, 18, (*size, 3))
    elif look.texture == "stripes":
        stripes = (np.add.outer(np.arange(size[0]), np.arange(size[1])) // 4) % 2 == 0
        fill[stripes] *= 0.6
    return np.clip(fill, 0, 255).astype(np.uint8)


def _distinct_colours(rng: np.random.Generator, n: int, min_distance: float = 90.0) -> list[tuple[int, int, int]]:
    """`n` random colours at least `min_distance` apart (RGB), drawn by rejection."""
    colours: list[np.ndarray] = []
    while len(colours) < n:
        candidate = rng.integers(0, 256, 3)
        if all(np.linalg.norm(candidate - other) >= min_distance for other in colours):
            colours.append(candidate)
    return [tuple(int(c) for c in colour) for colour in colours]
