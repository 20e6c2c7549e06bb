"""`evaluate`: IoU 1.0 for a perfect label set, the exact values of a hand-made case, missing and unusable labels
counted against the score, on local disk and S3."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pytest
from PIL import Image

from jobs.autolabel import main as cli
from model.processing import build_palette, encode_png
from pipeline.evaluate import evaluate
from pipeline.write import LabelWriter, write_job_files
from test_write import batch, result

CLASSES = ["background", "disc", "square"]
TRUTH_A = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]], np.uint8)
LABELS_A = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]], np.uint8)


def png(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return bucket, options


def make_output(uri: str, options: dict, rows: list[dict]) -> None:
    LabelWriter(uri, options, png=False)(batch(rows))
    write_job_files(uri, options, {"classes": CLASSES}, success=True)


def labelled(key: str, labels: np.ndarray) -> dict:
    return {**result(key), "mask": encode_png(labels, build_palette(2))}


def put_truth(uri: str, options: dict, truth: dict[str, np.ndarray]) -> None:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.makedirs(root, exist_ok=True)
    for name, labels in truth.items():
        fs.pipe_file(f"{root}/{name}", png(labels))


def test_hand_made_case_with_missing_and_unusable_labels(place, capsys):
    base, options = place
    output, truth = f"{base}/out", f"{base}/truth"
    make_output(output, options, [
        labelled("a.jpg", LABELS_A),
        result("c.jpg", ok=False),  # an error row
        labelled("d.jpg", LABELS_A),  # no truth: not compared
        {**result("e.jpg"), "mask": b"not a png"},  # an unreadable mask
    ])
    put_truth(truth, options, {"a.png": TRUTH_A, "b.jpg.png": np.ones((2, 2), np.uint8),  # b: no row at all
                               "c.png": np.zeros((2, 2), np.uint8), "e.png": np.full((1, 2), 2, np.uint8)})

    scores = evaluate(output, truth, storage_options=options)

    # By hand, a alone: disc 4 of 5, square 2 of 4, background 7 of 10; 13 of 16 pixels right.
    # b adds 4 missed disc pixels, c 4 missed background pixels, e 2 missed square pixels.
    assert scores.iou == pytest.approx([7 / 14, 4 / 9, 2 / 6])
    assert scores.mean_iou == pytest.approx((4 / 9 + 2 / 6) / 2)
    assert scores.pixel_accuracy == pytest.approx(13 / 26)
    assert (scores.compared, scores.without_truth) == (1, 1)
    missing = sorted(scores.missing)
    assert missing[:2] == ["b.jpg.png: no row in labels/", "c.jpg: error row"]  # by truth file, or by key
    assert missing[2].startswith("e.jpg: mask cannot be decoded: ")

    assert cli(["evaluate", "--labels", output, "--truth", truth, "--storage-options", json.dumps(options)]) == 0
    printed = capsys.readouterr().out
    assert "mean IoU (foreground) 0.389" in printed and "missing or unusable 3" in printed
    fs, root = fsspec.core.url_to_fs(output, **options)
    written = json.loads(fs.cat_file(f"{root}/_evaluation.json"))
    assert written["mean_iou"] == pytest.approx(scores.mean_iou) and written["missing"] == 3
    assert written["iou"]["disc"] == pytest.approx(4 / 9)


def test_a_perfect_label_set_scores_one(tmp_path):
    rng = np.random.default_rng(0)
    truth = {f"img{i}.jpg": rng.integers(0, 3, (5 + i, 7)).astype(np.uint8) for i in range(4)}
    make_output(str(tmp_path / "out"), {}, [labelled(key, labels) for key, labels in truth.items()])
    put_truth(str(tmp_path / "truth"), {}, {key.replace(".jpg", ".png"): labels for key, labels in truth.items()})
    scores = evaluate(str(tmp_path / "out"), str(tmp_path / "truth"))
    assert scores.iou == [1.0, 1.0, 1.0] and scores.mean_iou == 1.0 and scores.pixel_accuracy == 1.0
    assert (scores.compared, scores.missing, scores.without_truth) == (4, [], 0)
