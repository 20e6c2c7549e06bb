"""Review a job's labels: overlay pictures of a sample or of the lowest-scoring images, and one static page.

Under `review/` of the output (or `to`):

- `overlays/<key>.jpg` (`pipeline.storage.output.key_path`): the image as the job labelled it (EXIF-turned when the job
  turned it), read from its `source` (loose files, tar and Parquet shards), with each class's colour blended in, the
  outline of every region drawn, and a legend of the classes present;
- `index.html`: the overlays in a grid, lowest score first, each with its key, score and per-class scores, and a
  table over the whole run from one streaming pass over `labels/`: per class, pixels, images and mean class score.

The page is static (no server, no script): it opens from disk or from a bucket. Selection: `lowest` keeps the N
ok rows with the lowest score (with `class_name`, the lowest score of that class, among images that have it);
`sample` draws N ok rows at random (seeded; with `class_name`, among images that have it).
"""

from __future__ import annotations

import heapq
import io
import json
import math
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import jinja2
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from model.processing import decode_png
from pipeline.storage.formats import read_images
from pipeline.storage.output import JOB_FILE, key_path, label_rows

REVIEW_DIR = "review"
_COLUMNS = ["key", "source", "status", "score", "class_ids", "pixel_counts", "mask"]  # and class_scores if there


class ReviewError(ValueError):
    """The review cannot start: no job output there, or a class it does not have."""


def overlay(image: np.ndarray, class_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: `image` with every pixel of a class other than background blended with its class colour."""
    colours = palette[class_map].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where((class_map > 0)[..., None], blended, image).astype(np.uint8)


def review_picture(image: np.ndarray, class_map: np.ndarray, palette: np.ndarray, names: list[str]) -> Image.Image:
    """The overlay with region outlines (in the class colour, darkened) and a legend of the classes present."""
    picture = overlay(image, class_map, palette)
    thickness = max(1, min(class_map.shape) // 300)
    present = [int(class_id) for class_id in np.unique(class_map) if class_id > 0]
    for class_id in present:
        contours, _ = cv2.findContours((class_map == class_id).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        outline = tuple(int(v) for v in palette[class_id] // 2)
        cv2.drawContours(picture, contours, -1, outline, thickness)
    result = Image.fromarray(picture)
    draw = ImageDraw.Draw(result)
    for row, class_id in enumerate(present):
        top = 4 + row * 14
        draw.rectangle([4, top, 14, top + 10], fill=tuple(int(v) for v in palette[class_id]), outline=(0, 0, 0))
        draw.text((18, top - 1), names[class_id], fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return result


@dataclass
class ClassTotals:
    pixels: int = 0
    images: int = 0
    score_sum: float = 0.0
    scored: int = 0

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.scored if self.scored else None


@dataclass
class Review:
    page: str  # URI of index.html
    overlays: list[str]  # URIs of the pictures written
    rows: int = 0
    ok: int = 0
    unreadable: list[str] = field(default_factory=list)  # selected keys whose image could not be read

    def __str__(self) -> str:
        missing = f"; {len(self.unreadable)} images could not be read from their sources" if self.unreadable else ""
        return (
            f"review: {len(self.overlays)} overlays of {self.ok} ok rows ({self.rows} rows){missing}; open {self.page}"
        )


def review(
    output_uri: str,
    *,
    sample: int | None = None,
    lowest: int | None = None,
    class_name: str | None = None,
    to: str | None = None,
    storage_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> Review:
    """Write overlays of the chosen rows and `index.html` for the job output at `output_uri` (default: a sample of
    100 when neither `sample` nor `lowest` is given)."""
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(output_uri, **options)
    job = _job_record(fs, root, output_uri)
    names, palette = job["classes"], np.array(job["palette"], np.uint8)
    if class_name is not None and class_name not in names[1:]:
        raise ReviewError(f"--class: {class_name} is not among the job's classes ({', '.join(names[1:])})")
    if sample is None and lowest is None:
        sample = 100
    chooser = RowChooser(sample or 0, lowest or 0, None if class_name is None else names.index(class_name), seed)
    totals = [ClassTotals() for _ in names]
    result = Review(page="", overlays=[])
    for row in label_rows(fs, root, _COLUMNS, optional=("class_scores",)):
        result.rows += 1
        if row["status"] == "ok":
            result.ok += 1
            _count(totals, row)
            chooser.offer(row)

    out_fs, out_root = fsspec.core.url_to_fs((to or f"{output_uri.rstrip('/')}/{REVIEW_DIR}").rstrip("/"), **options)
    cards = _write_overlays(
        chooser.chosen(), names, palette, job.get("config", {}).get("input", {}), out_fs, out_root, options, result
    )
    page = _TEMPLATE.render(
        output=output_uri,
        rows=result.rows,
        ok=result.ok,
        cards=cards,
        unreadable=result.unreadable,
        selection=_describe(sample, lowest, class_name),
        totals=[(names[cid], tuple(int(v) for v in palette[cid]), totals[cid]) for cid in range(1, len(names))],
    )
    out_fs.pipe_file(f"{out_root}/index.html", page.encode())
    result.page = out_fs.unstrip_protocol(f"{out_root}/index.html")
    return result


def _job_record(fs: fsspec.AbstractFileSystem, root: str, output_uri: str) -> dict[str, Any]:
    try:
        return json.loads(fs.cat_file(f"{root}/{JOB_FILE}"))
    except FileNotFoundError:
        raise ReviewError(f"{output_uri}: no {JOB_FILE}: not the output of a labelling job") from None


def _class_scores(row: dict[str, Any]) -> list[float | None]:
    return row.get("class_scores") or [None] * len(row["class_ids"])


def _count(totals: list[ClassTotals], row: dict[str, Any]) -> None:
    """Add an ok row's classes to the run's totals."""
    for cid, pixels, score in zip(row["class_ids"], row["pixel_counts"], _class_scores(row)):
        totals[cid].pixels += pixels
        totals[cid].images += 1
        if score is not None:
            totals[cid].score_sum += score
            totals[cid].scored += 1


def _write_overlays(
    chosen: list[dict[str, Any]],
    names: list[str],
    palette: np.ndarray,
    config: dict[str, Any],
    fs: fsspec.AbstractFileSystem,
    root: str,
    storage_options: dict[str, Any],
    result: Review,
) -> list[dict[str, Any]]:
    """Write each chosen row's picture under `root`/overlays/ and return the page's cards, lowest score first; a row
    whose image cannot be read goes to `result.unreadable`. `config` is the job's input section."""
    images = read_images(chosen, image_column=config.get("image_column", "image"), storage_options=storage_options)
    cards = []
    for row in chosen:
        if row["key"] not in images:
            result.unreadable.append(row["key"])
            continue
        picture = _picture(images[row["key"]], row, palette, names, config.get("exif_transpose", True))
        relative = f"overlays/{key_path(row['key'], '.jpg')}"
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=88)
        fs.makedirs(f"{root}/{relative}".rpartition("/")[0], exist_ok=True)
        fs.pipe_file(f"{root}/{relative}", buffer.getvalue())
        result.overlays.append(fs.unstrip_protocol(f"{root}/{relative}"))
        cards.append(
            {
                "key": row["key"],
                "src": urllib.parse.quote(relative),
                "score": row["score"],
                "classes": [(names[cid], score) for cid, score in zip(row["class_ids"], _class_scores(row)) if cid > 0],
            }
        )
    return sorted(cards, key=lambda card: math.inf if card["score"] is None else card["score"])


class RowChooser:
    """The rows to picture, chosen in one pass keeping at most `lowest + sample` rows (masks included)."""

    def __init__(self, sample: int, lowest: int, class_id: int | None, seed: int) -> None:
        self.sample, self.lowest, self.class_id = sample, lowest, class_id
        self.random = random.Random(seed)
        self.seen = 0
        self.reservoir: list[dict[str, Any]] = []
        self.worst: list[tuple[float, int, dict[str, Any]]] = []  # a max-heap by score, as (-score, order, row)

    def offer(self, row: dict[str, Any]) -> None:
        score = self._score(row)
        if score is None:
            return
        self.seen += 1
        if self.sample:  # reservoir sampling
            if len(self.reservoir) < self.sample:
                self.reservoir.append(row)
            elif (slot := self.random.randrange(self.seen)) < self.sample:
                self.reservoir[slot] = row
        if self.lowest:
            item = (-score, self.seen, row)
            if len(self.worst) < self.lowest:
                heapq.heappush(self.worst, item)
            elif item > self.worst[0]:
                heapq.heapreplace(self.worst, item)

    def _score(self, row: dict[str, Any]) -> float | None:
        """The score a row is judged by, or None when it is not a candidate."""
        if self.class_id is None:
            return -math.inf if row["score"] is None or math.isnan(row["score"]) else row["score"]
        if self.class_id not in row["class_ids"]:
            return None
        scores = row.get("class_scores")
        return scores[row["class_ids"].index(self.class_id)] if scores else row["score"]

    def chosen(self) -> list[dict[str, Any]]:
        rows = {row["key"]: row for _, _, row in self.worst}
        rows.update({row["key"]: row for row in self.reservoir})
        return list(rows.values())


def _picture(data: bytes, row: dict[str, Any], palette: np.ndarray, names: list[str], exif: bool) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        shown = (ImageOps.exif_transpose(image) if exif else image).convert("RGB")
        return review_picture(np.asarray(shown), decode_png(row["mask"]), palette, names)


def _describe(sample: int | None, lowest: int | None, class_name: str | None) -> str:
    parts = ([f"the {lowest} lowest-scoring"] if lowest else []) + ([f"a random {sample}"] if sample else [])
    return " and ".join(parts) + " ok images" + (f" with {class_name}" if class_name else "")


_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review: {{ output }}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: -0.1em;
          border: 1px solid #888; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; height: auto; display: block; background: #eee; }
figcaption { font-size: 12px; overflow-wrap: anywhere; } .score { font-weight: 600; }
</style></head><body>
<h1>Review of {{ output }}</h1>
<p>{{ rows }} rows, {{ ok }} ok. Pictured: {{ selection }}, lowest score first.</p>
<h2>Classes over the whole run</h2>
<table><tr><th>class</th><th>pixels</th><th>images</th><th>mean class score</th></tr>
{% for name, colour, total in totals -%}
<tr><td><span class="swatch" style="background: rgb{{ colour }}"></span>{{ name }}</td>
<td>{{ "{:,}".format(total.pixels) }}</td><td>{{ total.images }}</td>
<td>{{ "-" if total.mean_score is none else "%.3f" % total.mean_score }}</td></tr>
{% endfor %}</table>
<h2>{{ cards | length }} images</h2>
{% if unreadable %}<p>Not pictured, their image could not be read: {{ unreadable | join(", ") }}</p>{% endif %}
<div class="grid">
{% for card in cards %}<figure><img src="{{ card.src }}" alt="{{ card.key }}">
<figcaption><span class="score">{{ "-" if card.score is none else "%.3f" % card.score }}</span> {{ card.key }}<br>
{% for name, score in card.classes -%}
{{ name }} {{ "-" if score is none else "%.2f" % score }}{{ ", " if not loop.last }}{% endfor %}
</figcaption></figure>
{% endfor %}</div>
</body></html>
""")
