"""`review`: which rows it pictures (lowest scores, by class, a sample), the whole-run class table, and the page
opened in a real headless Chromium: no console errors, every overlay shown."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from test_write import batch, result

from jobs.cli import main as cli
from model.processing import build_palette, encode_png
from pipeline.labelling.write import LabelWriter
from pipeline.results.review import review
from pipeline.storage.output import write_job_files

CLASSES = ["background", "bar", "disc"]
PALETTE = build_palette(2)


def labels_of(i: int) -> np.ndarray:
    """Image i (120 x 160): a bar (class 1) on every image, a disc (class 2) on even ones."""
    labels = np.zeros((30, 40), np.uint8)
    labels[4:10, 5 + i % 10 : 25 + i % 10] = 1
    if i % 2 == 0:
        yy, xx = np.mgrid[:30, :40]
        labels[np.hypot(yy - 20, xx - 28) <= 6] = 2
    return np.kron(labels, np.ones((4, 4), np.uint8))


@pytest.fixture
def output(tmp_path) -> tuple[str, dict[str, dict]]:
    """A local job output of 40 ok rows (scores 0.01 .. 0.40 in a shuffled order, disc scores the other way round)
    whose images exist at their sources, and 3 error rows."""
    images = tmp_path / "images"
    images.mkdir()
    order = np.random.default_rng(0).permutation(40)
    rows = {}
    for i, rank in enumerate(order):
        key = f"cam {i % 3}/{i:02d}.jpg"  # a space: the page must quote its links
        (images / key).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((120, 160, 3), 90 + i, np.uint8)).save(images / key)
        labels = labels_of(i)
        counts = np.bincount(labels.ravel(), minlength=3)
        class_ids = np.flatnonzero(counts).tolist()
        score = (rank + 1) / 100
        class_scores = [0.9, score, 1 - score][: len(class_ids)]
        rows[key] = {
            **result(key),
            "source": str(images / key),
            "width": 160,
            "height": 120,
            "mask": encode_png(labels, PALETTE),
            "class_ids": class_ids,
            "pixel_counts": counts[counts > 0].tolist(),
            "score": score,
            "class_scores": class_scores,
        }
    uri = str(tmp_path / "out")
    LabelWriter(uri, {}, png=False)(batch([*rows.values(), *(result(f"bad/{i}.jpg", ok=False) for i in range(3))]))
    write_job_files(
        uri,
        {},
        {
            "classes": CLASSES,
            "palette": PALETTE.tolist(),
            "config": {"input": {"image_column": "image", "exif_transpose": True}},
        },
        success=True,
    )
    return uri, rows


def test_lowest_scores_by_image_and_by_class(output, tmp_path):
    uri, rows = output
    lowest = review(uri, lowest=5, to=str(tmp_path / "lowest"))
    by_score = sorted(rows, key=lambda key: rows[key]["score"])
    assert sorted(path.split("/overlays/")[1] for path in lowest.overlays) == sorted(
        f"{key}.jpg" for key in by_score[:5]
    )
    assert (lowest.rows, lowest.ok, lowest.unreadable) == (43, 40, [])

    discs = review(uri, lowest=3, class_name="disc", to=str(tmp_path / "discs"))  # the disc's score: 1 - score
    with_disc = sorted((key for key in rows if 2 in rows[key]["class_ids"]), key=lambda key: -rows[key]["score"])
    assert sorted(path.split("/overlays/")[1] for path in discs.overlays) == sorted(
        f"{key}.jpg" for key in with_disc[:3]
    )

    sample = review(uri, sample=7, class_name="disc", to=str(tmp_path / "sample"))
    pictured = [path.split("/overlays/")[1][:-4] for path in sample.overlays]
    assert len(set(pictured)) == 7 and all(2 in rows[key]["class_ids"] for key in pictured)


def test_overlay_pictures_show_classes_outlines_and_legend(output, tmp_path):
    uri, rows = output
    result_ = review(uri, lowest=1, to=str(tmp_path / "one"))
    (key,) = [key for key in rows if rows[key]["score"] == 0.01]
    picture = np.asarray(Image.open(result_.overlays[0].removeprefix("file://")))
    original = np.full((120, 160, 3), 90 + int(key.split("/")[1][:2]), np.uint8)
    labels = labels_of(int(key.split("/")[1][:2]))
    assert picture.shape == original.shape
    inside = labels == 1
    inside[:, :40] = False  # away from the legend in the corner
    blended = 0.45 * original.astype(float) + 0.55 * PALETTE[1]
    near = np.abs(picture[inside].astype(float) - blended[inside]).max(axis=1) < 40  # JPEG, outlines
    assert near.mean() > 0.8
    background = labels == 0
    background[:40, :80] = False  # the legend
    assert np.abs(picture[background].astype(float) - original[background]).max() < 40  # untouched (JPEG's noise)
    edge = labels == 1
    edge[1:-1, 1:-1] &= ~(edge[:-2, 1:-1] & edge[2:, 1:-1] & edge[1:-1, :-2] & edge[1:-1, 2:])  # the region's rim
    edge[:, :40] = False
    dark = PALETTE[1] // 2
    assert (np.abs(picture[edge].astype(float) - dark).max(axis=1) < 60).mean() > 0.5  # its outline
    assert np.abs(picture[9, 9].astype(float) - PALETTE[1]).max() < 40  # the legend's swatch of the first class


def test_the_page_in_headless_chromium(output, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    uri, rows = output
    assert cli(["review", uri, "--lowest", "6", "--sample", "10"]) == 0
    page_path = f"{uri}/review/index.html"
    written = list((tmp_path / "out" / "review" / "overlays").rglob("*.jpg"))
    html = open(page_path).read()
    assert "bar" in html and "disc" in html and "40 ok" in html
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"file://{page_path}", wait_until="load")
        shown = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        cells = page.evaluate("[...document.querySelectorAll('table tr')].map(r => r.innerText)")
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    assert errors == []
    assert shown == len(written) >= 10  # every overlay written is on the page, and loaded
    bar = next(cell for cell in cells if cell.startswith("bar"))
    total_bar = sum(int((labels_of(i) == 1).sum()) for i in range(40))
    assert bar.split("\t")[1:3] == [f"{total_bar:,}", "40"]  # pixels and images over the whole run
    assert abs(float(bar.split("\t")[3]) - np.mean([row["score"] for row in rows.values()])) < 1e-3
    assert Image.open(tmp_path / "review.png").size[0] == 1200
