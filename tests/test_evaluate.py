"""`evaluate`: the exact values of hand-counted cases and of mmsegmentation's definition written out here; the 255
"ignore" label, truth ids that are not classes, missing and unusable labels; truth in every layout of a labelled pool
(loose pairs with JPEG and PNG images, label maps by key, WebDataset and Parquet shards); per-image scores; local
disk and S3."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_read import parquet_bytes, tar_bytes
from test_write import batch, result

from jobs.cli import main as cli
from model.processing import build_palette, encode_png
from pipeline.labelling.write import LabelWriter
from pipeline.results.evaluate import evaluate, report, table
from pipeline.storage.output import write_job_files

CLASSES = ["background", "disc", "square"]
TRUTH_A = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]], np.uint8)
LABELS_A = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]], np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return bucket, options


def make_output(uri: str, options: dict, *batches: list[dict]) -> None:
    """One labels file per batch."""
    writer = LabelWriter(uri, options, png=False)
    for rows in batches:
        writer(batch(rows))
    write_job_files(uri, options, {"classes": CLASSES}, success=True)


def labelled(key: str, labels: np.ndarray) -> dict:
    return {**result(key), "mask": encode_png(labels, build_palette(2))}


def put(uri: str, options: dict, files: dict[str, bytes]) -> None:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.makedirs(root, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)


def mmseg_counts(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore: int | None):
    """mmsegmentation's `intersect_and_union`, written out: per image, drop the ignored truth pixels, then histogram
    the predictions that match, the predictions and the truth; areas summed over the images."""
    inter, pred_area, truth_area = (np.zeros(num_classes) for _ in range(3))
    for truth, pred in pairs:
        keep = np.ones(truth.shape, bool) if ignore is None else truth != ignore
        t, p = truth[keep].astype(int), pred[keep].astype(int)
        inter += np.histogram(p[p == t], bins=num_classes, range=(0, num_classes))[0]
        pred_area += np.histogram(p, bins=num_classes, range=(0, num_classes))[0]
        truth_area += np.histogram(t, bins=num_classes, range=(0, num_classes))[0]
    union = pred_area + truth_area - inter
    iou = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    return iou, inter.sum() / truth_area.sum()


def test_hand_made_case_with_ignore_pixels_missing_and_unusable(place, capsys):
    base, options = place
    output, truth = f"{base}/out", f"{base}/truth"
    ignored = TRUTH_A.copy()
    ignored[3, :] = 255  # the bottom row: "don't care", where a's labels are all background
    ignored[0, 1] = 255  # a pixel a's labels call disc
    make_output(
        output,
        options,
        [
            labelled("a.jpg", LABELS_A),
            result("c.jpg", ok=False),  # an error row
            labelled("d.jpg", LABELS_A),  # no truth: not compared
        ],
        [
            {**result("e.jpg"), "mask": b"not a png"},  # an unreadable mask
            labelled("f.jpg", LABELS_A),  # truth with an id that is not a class
        ],
    )
    put(
        truth,
        options,
        {
            "a.png": png(ignored),
            "b.jpg.png": png(np.ones((2, 2), np.uint8)),  # b: no row at all
            "c.png": png(np.zeros((2, 2), np.uint8)),
            "e.png": png(np.full((1, 2), 2, np.uint8)),
            "f.png": png(np.array([[0, 7], [2, 1]], np.uint8)),
        },
    )

    scores = evaluate(output, truth, storage_options=options)

    # By hand, a without its 5 ignored pixels (11 left): background truth 3, labelled 3 + 2 (two square pixels),
    # both 3; disc truth 4, labels 4, both 4; square truth 4, labels 2, both 2. 9 of 11 pixels right.
    assert mmseg_counts([(ignored, LABELS_A)], 3, 255)[0] == pytest.approx([3 / 5, 4 / 4, 2 / 4])
    # b adds 4 missed disc pixels, c 4 missed background pixels, e 2 missed square pixels; f is scored nowhere.
    assert scores.iou == pytest.approx([3 / (5 + 4), 4 / (4 + 4), 2 / (4 + 2)])
    assert scores.pixel_accuracy == pytest.approx((3 + 4 + 2) / (11 + 4 + 4 + 2))
    assert scores.mean_iou == pytest.approx((4 / 8 + 2 / 6) / 2)
    assert (scores.compared, scores.without_truth, scores.ignored_pixels) == (1, 1, 5)
    assert sorted(scores.missing) == ["b.jpg.png", "c.jpg", "e.jpg"]  # by truth file, or by key
    assert scores.missing["c.jpg"] == "error row" and scores.missing["b.jpg.png"] == "no row in labels/"
    assert scores.missing["e.jpg"].startswith("mask cannot be decoded: ")
    assert scores.unusable == {"f.jpg": "truth ids [7] are neither classes 0..2 nor the ignore index 255"}

    assert cli(["evaluate", output, "--truth", truth, "--storage-options", json.dumps(options), "--lowest", "2"]) == 0
    printed = capsys.readouterr().out
    assert "mean IoU (foreground) 0.417" in printed and "ignore index 255 (5 pixels)" in printed
    assert "images compared 1, missing 3, unusable truth 1" in printed and "unusable: f.jpg: truth ids [7]" in printed
    header, first, second = printed.split("lowest 2 images by mean IoU:\n")[1].splitlines()[:3]
    assert header.split()[:2] == ["key", "mean"]
    assert first.split()[:2] == ["b.jpg.png", "0.000"] and second.split()[:2] == ["e.jpg", "0.000"]
    assert first.endswith("(missed)") and second.endswith("(missed)")
    fs, root = fsspec.core.url_to_fs(output, **options)
    written = json.loads(fs.cat_file(f"{root}/_evaluation.json"))
    assert written["mean_iou"] == pytest.approx(scores.mean_iou) and written["missing"] == 3
    assert written["unusable"] == 1 and written["iou"]["disc"] == pytest.approx(4 / 8)
    assert "summed over the images" in written["definition"] and written["ignore_index"] == 255
    images = {image["key"]: image for image in written["images"]}
    assert sorted(images) == ["a.jpg", "b.jpg.png", "c.jpg", "e.jpg"]
    assert images["a.jpg"]["status"] == "compared" and images["a.jpg"]["iou"] == pytest.approx(
        {"background": 3 / 5, "disc": 1.0, "square": 0.5}
    )
    assert images["a.jpg"]["mean_iou"] == pytest.approx(0.75)
    assert images["b.jpg.png"] == {
        "key": "b.jpg.png",
        "status": "missed",
        "mean_iou": 0.0,
        "iou": {"background": None, "disc": 0.0, "square": None},
    }


def test_ignore_index_options_against_mmseg_on_many_images(tmp_path, capsys):
    """Random maps over three labels files, a tenth of each truth 255: the default equals mmseg's definition; `none`
    makes every such image unusable (255 is not a class); another value ignores that id instead."""
    rng = np.random.default_rng(0)
    keys = [f"img{i:02d}.jpg" for i in range(12)]
    truths = {key: rng.integers(0, 3, (6 + i % 3, 9)).astype(np.uint8) for i, key in enumerate(keys)}
    preds = {
        key: np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 3, t.shape)).astype(np.uint8)
        for key, t in truths.items()
    }
    for t in truths.values():
        t[rng.random(t.shape) < 0.1] = 255
    output, truth = str(tmp_path / "out"), str(tmp_path / "truth")
    make_output(output, {}, *[[labelled(key, preds[key]) for key in keys[i : i + 4]] for i in (0, 4, 8)])
    put(truth, {}, {key.replace(".jpg", ".png"): png(t) for key, t in truths.items()})

    iou, accuracy = mmseg_counts([(truths[k], preds[k]) for k in keys], 3, 255)
    scores = evaluate(output, truth)
    assert scores.iou == pytest.approx(iou) and scores.pixel_accuracy == pytest.approx(accuracy)
    assert scores.compared == 12 and scores.ignored_pixels == sum(int((t == 255).sum()) for t in truths.values())

    off = evaluate(output, truth, ignore_index=None)
    assert off.compared == 0 and sorted(off.unusable) == keys
    assert off.unusable["img00.jpg"] == "truth ids [255] are neither classes 0..2"

    for t in truths.values():  # 255 back to class 2; class 1 ignored instead
        t[t == 255] = 2
    put(truth, {}, {key.replace(".jpg", ".png"): png(t) for key, t in truths.items()})
    assert (
        cli(["evaluate", output, "--truth", truth, "--ignore-index", "1", "--json", str(tmp_path / "scores.json")]) == 0
    )
    iou, accuracy = mmseg_counts([(truths[k], preds[k]) for k in keys], 3, 1)
    written = json.loads((tmp_path / "scores.json").read_text())
    assert list(written["iou"].values()) == pytest.approx(iou) and written["pixel_accuracy"] == pytest.approx(accuracy)
    assert written["ignore_index"] == 1 and written["compared"] == 12
    with pytest.raises(SystemExit) as refused:
        cli(["evaluate", output, "--truth", truth, "--ignore-index", "x"])
    assert refused.value.code == 2 and "expected a label value (0..65535) or none, got 'x'" in capsys.readouterr().err


def test_the_pairs_layout_with_png_and_jpeg_images(tmp_path):
    """A labelled pool as prompt folders and training have it: `a.jpg` + `a.png`, `b.png` + `b.mask.png`. The RGB image
    `b.png` is never read as truth; `g.png` + `g.mask.png` has no row: missed, counted once."""
    rng = np.random.default_rng(1)
    maps = {name: rng.integers(0, 3, (8, 8)).astype(np.uint8) for name in "abg"}
    picture = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
    put(
        str(tmp_path / "pool"),
        {},
        {
            "a.jpg": jpeg(picture),
            "a.png": png(maps["a"]),
            "b.png": png(picture),
            "b.mask.png": png(maps["b"]),
            "g.png": png(picture),
            "g.mask.png": png(maps["g"]),
        },
    )
    wrong = (maps["b"] + 1) % 3
    put(str(tmp_path / "pool"), {}, {"h.png": png(picture)})  # an image without a mask, and h.jpg's row
    make_output(
        str(tmp_path / "out"),
        {},
        [labelled("a.jpg", maps["a"]), labelled("b.png", wrong), labelled("h.jpg", maps["a"])],
    )

    scores = evaluate(str(tmp_path / "out"), str(tmp_path / "pool"))
    iou, accuracy = mmseg_counts(
        [(maps["a"], maps["a"]), (maps["b"], wrong), (maps["g"], np.full((8, 8), -1))], 3, 255
    )  # g: nothing predicted
    assert scores.iou == pytest.approx(iou) and scores.pixel_accuracy == pytest.approx(accuracy)
    assert scores.compared == 2 and list(scores.missing) == ["g.mask.png"]
    assert scores.unusable == {"h.jpg": "truth: RGB image, not a label map (pixel = class id)"}
    images = {image["key"]: image["mean_iou"] for image in report(scores)["images"]}
    assert images == {"a.jpg": 1.0, "b.png": 0.0, "g.mask.png": 0.0}


def test_webdataset_and_parquet_truth_with_other_mask_names(tmp_path):
    """Truth in shards, keyed as the job keys their images: `shard.tar/0001.jpg`, `table.parquet/ROW`."""
    rng = np.random.default_rng(2)
    maps = [rng.integers(0, 3, (6, 7)).astype(np.uint8) for _ in range(5)]
    picture = jpeg(rng.integers(0, 255, (6, 7, 3)).astype(np.uint8))
    members = [(f"000{i}.jpg", picture) for i in range(3)]
    members = [m for i, member in enumerate(members) for m in (member, (f"000{i}.label.png", png(maps[i])))]
    table_bytes = parquet_bytes(
        pa.table(
            {
                "image": [picture] * 2,
                "truth": [{"bytes": png(maps[3]), "path": "3.png"}, {"bytes": png(maps[4]), "path": None}],
            }
        ),
        1,
    )  # the HF struct
    put(str(tmp_path / "truth"), {}, {"shard.tar": tar_bytes(members), "table.parquet": table_bytes})
    preds = [np.where(rng.random(m.shape) < 0.6, m, 0).astype(np.uint8) for m in maps]
    keys = ["shard.tar/0000.jpg", "shard.tar/0001.jpg", "shard.tar/0002.jpg", "table.parquet/0", "table.parquet/1"]
    make_output(str(tmp_path / "out"), {}, [labelled(key, pred) for key, pred in zip(keys[:4], preds)])

    scores = evaluate(str(tmp_path / "out"), str(tmp_path / "truth"), mask_field="label.png", mask_column="truth")
    iou, _ = mmseg_counts([*zip(maps[:4], preds[:4]), (maps[4], np.full(maps[4].shape, -1))], 3, 255)
    assert scores.iou == pytest.approx(iou)
    assert scores.compared == 4 and list(scores.missing) == ["table.parquet/1"]
    assert "lowest 1 images by mean IoU:" in table(scores, lowest=1)

    plain = evaluate(str(tmp_path / "out"), str(tmp_path / "truth"))  # the default names find no masks
    assert plain.compared == 0 and set(plain.unusable) == {*keys[:3], "table.parquet"}  # a sample, or the shard
    assert plain.unusable["shard.tar/0000.jpg"] == "truth: no seg.png member"
    assert "mask" in plain.unusable["table.parquet"] and plain.without_truth == 1  # table.parquet/0


def test_png_images_scored_against_a_folder_of_masks_named_like_them(tmp_path):
    """Inputs `q0.png`, `q1.png`; truth in a folder of its own, `q0.png`, `q1.png` (label maps), as a dataset's mask
    folder names them: each key's truth is the label map of its name, not the image."""
    rng = np.random.default_rng(3)
    maps = {f"q{i}.png": rng.integers(0, 3, (5, 6)).astype(np.uint8) for i in range(2)}
    put(str(tmp_path / "truth"), {}, {name: png(labels) for name, labels in maps.items()})
    make_output(str(tmp_path / "out"), {}, [labelled(name, labels) for name, labels in maps.items()])
    scores = evaluate(str(tmp_path / "out"), str(tmp_path / "truth"))
    assert scores.compared == 2 and scores.mean_iou == 1.0 and not scores.missing


def test_an_output_that_is_not_there_is_refused(tmp_path, capsys):
    assert cli(["evaluate", str(tmp_path / "nothing"), "--truth", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nothing'}: no _job.json" in capsys.readouterr().err
