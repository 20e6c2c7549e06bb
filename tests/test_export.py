"""`export`: COCO, YOLO segmentation and label-map PNGs, round-tripped against hand-drawn class maps (more rows than
one read batch, over several labels files, with error rows among them); then a real job's output on S3 whose inputs
were WebDataset shards."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask
from test_write import batch, result

from jobs.cli import main as cli
from model.processing import build_palette, encode_png
from pipeline.labelling.write import LabelWriter
from pipeline.results.export import export
from pipeline.storage.output import write_job_files

CLASSES = ["background", "bar", "disc"]
SHAPES = [(60, 80), (90, 70), (64, 64)]  # (height, width)


def scene(seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """A class map drawn by hand, one shape per quadrant, and how many 8-connected regions each class has:
    class 1 a bar and a ring (a region with a hole) and a 3-pixel speck, class 2 a disc and two squares that touch
    only at a corner (one region)."""
    rng = np.random.default_rng(seed)
    height, width = SHAPES[seed % len(SHAPES)]
    labels = np.zeros((height, width), np.uint8)
    half_h, half_w = height // 2, width // 2
    top, left = rng.integers(1, 4, size=2)
    labels[top : top + 10, left : left + half_w - 6] = 1  # a bar, top left
    yy, xx = np.mgrid[:height, :width]
    cy, cx = half_h // 2, half_w + half_w // 2
    distance = np.hypot(yy - cy, xx - cx)
    labels[distance <= min(half_h, half_w) // 2 - 2] = 2  # a disc, top right
    cy, cx = half_h + half_h // 2, half_w // 2
    ring = np.hypot(yy - cy, xx - cx)
    labels[(ring <= min(half_h, half_w) // 2 - 2) & (ring >= 5)] = 1  # a ring, bottom left
    row, col = half_h + 3, half_w + 3
    labels[row : row + 6, col : col + 6] = 2  # two squares meeting at one corner, bottom right
    labels[row + 6 : row + 12, col + 6 : col + 12] = 2
    labels[height - 2, width - 4 : width - 1] = 1  # a speck of 3 pixels, bottom right corner
    return labels, {1: 3, 2: 2}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict, dict[str, np.ndarray]]:
    """A job output of 150 ok rows of hand-drawn maps in three labels files, and 5 error rows."""
    if request.param == "local":
        uri, options = str(tmp_path / "out"), {}
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        uri = f"{bucket}/out"
    maps = {f"day/{i:03d}.jpg": scene(i)[0] for i in range(150)}
    rows = [
        {
            **result(key),
            "width": labels.shape[1],
            "height": labels.shape[0],
            "mask": encode_png(labels, build_palette(2)),
        }
        for key, labels in maps.items()
    ]
    rows += [result(f"broken/{i}.jpg", ok=False) for i in range(5)]
    writer = LabelWriter(uri, options, png=False)
    for start in range(0, len(rows), 52):
        writer(batch(rows[start : start + 52]))
    write_job_files(uri, options, {"classes": CLASSES}, success=True)
    return uri, options, maps


def read_json(uri: str, options: dict) -> dict:
    with fsspec.open(uri, "r", **options) as file:
        return json.load(file)


def test_coco_round_trip(output):
    uri, options, maps = output
    lines: list[str] = []
    summary = export(uri, "coco", storage_options=options, log=lines.append, progress_every_s=0)

    assert (summary.images, summary.skipped, summary.regions) == (150, 5, 150 * 5)
    assert lines and lines[-1].startswith("export: ") and lines[-1].endswith(" of 155 rows")
    coco = read_json(f"{uri}/export/coco/instances.json", options)
    assert coco["categories"] == [
        {"id": 1, "name": "bar", "supercategory": ""},
        {"id": 2, "name": "disc", "supercategory": ""},
    ]
    images = {image["id"]: image for image in coco["images"]}
    assert sorted(image["file_name"] for image in images.values()) == sorted(maps)
    unions = {image_id: np.zeros((image["height"], image["width"]), np.uint8) for image_id, image in images.items()}
    regions = {(image_id, class_id): 0 for image_id in images for class_id in (1, 2)}
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        assert (image["height"], image["width"]) == maps[image["file_name"]].shape
        region = coco_mask.decode(
            {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        )
        ys, xs = np.nonzero(region)
        assert annotation["area"] == len(ys) and annotation["iscrowd"] == 0
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        union = unions[annotation["image_id"]]
        assert not union[region > 0].any()  # regions never overlap
        union[region > 0] = annotation["category_id"]
        regions[annotation["image_id"], annotation["category_id"]] += 1
    for image_id, image in images.items():
        labels, counts = scene(int(image["file_name"][4:7]))
        assert np.array_equal(unions[image_id], labels)  # every pixel of every class
        assert {class_id: regions[image_id, class_id] for class_id in (1, 2)} == counts


def test_masks_round_trip_and_a_class_subset(output, tmp_path):
    uri, options, maps = output
    assert export(uri, "masks", storage_options=options).images == 150
    fs, root = fsspec.core.url_to_fs(f"{uri}/export/masks", **options)
    for key, labels in maps.items():
        assert np.array_equal(np.asarray(Image.open(fs.open(f"{root}/{key}.png"))), labels)

    to = str(tmp_path / "discs")
    summary = export(uri, "masks", to=to, classes=["disc"], min_area=1, storage_options=options)
    assert summary.regions == 150 * 2
    for key, labels in maps.items():
        assert np.array_equal(np.asarray(Image.open(f"{to}/{key}.png")), np.where(labels == 2, 2, 0))


def test_yolo_polygons_cover_their_regions(output, tmp_path):
    uri, options, maps = output
    to = str(tmp_path / "yolo")
    summary = export(uri, "yolo-seg", to=to, min_area=20, storage_options=options)  # the specks go
    assert summary.regions == 150 * 4
    data = yaml.safe_load(open(f"{to}/data.yaml"))
    assert data["nc"] == 2 and data["names"] == {0: "bar", 1: "disc"}
    for key, labels in maps.items():
        height, width = labels.shape
        lines = open(f"{to}/labels/{key[:-4]}.txt").read().splitlines()
        assert sorted(int(line.split()[0]) for line in lines) == [0, 0, 1, 1]
        for line in lines:
            number, *values = line.split()
            points = np.round(np.array(values, float).reshape(-1, 2) * (width, height))  # back to pixel centres
            canvas = Image.new("1", (width, height))
            ImageDraw.Draw(canvas).polygon([tuple(point) for point in points], fill=1)
            polygon = np.asarray(canvas)
            class_pixels = labels == int(number) + 1
            region = _component_of(class_pixels, polygon & class_pixels)
            if region.sum() > 100:
                iou = (polygon & region).sum() / (polygon | region).sum()
                assert iou >= 0.95, (key, number, iou)


def _component_of(pixels: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The pixels of `pixels` 8-connected to `seed` (a plain flood fill, independent of the exporter's OpenCV)."""
    reached = seed & pixels
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        grown &= pixels
        if (grown == reached).all():
            return reached
        reached = grown


def test_cli_refuses_unknown_classes(output, capsys):
    uri, options, _ = output
    assert (
        cli(["export", uri, "--format", "coco", "--classes", "bar,cat", "--storage-options", json.dumps(options)]) == 2
    )
    assert "--classes: cat not among the job's classes (bar, disc)" in capsys.readouterr().err


def test_outputs_from_before_class_scores_still_export_and_review(tmp_path):
    """A labels file without the `class_scores` column (written before it existed) beside a current one."""
    from pipeline.results.review import review

    uri = str(tmp_path / "out")
    maps = {f"old/{i}.jpg": scene(i)[0] for i in range(3)}
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for key, labels in maps.items():
        source = images / key.replace("/", "-")
        Image.fromarray(np.zeros((*labels.shape, 3), np.uint8)).save(source, format="PNG")
        rows.append(
            {
                **result(key),
                "source": str(source),
                "width": labels.shape[1],
                "height": labels.shape[0],
                "mask": encode_png(labels, build_palette(2)),
            }
        )
    LabelWriter(uri, {}, png=False)(batch(rows[:1]))
    old = batch(rows[1:]).drop_columns(["class_scores"])
    pq.write_table(old, f"{uri}/labels/part-old.parquet")
    write_job_files(uri, {}, {"classes": CLASSES, "palette": build_palette(2).tolist()}, success=True)

    assert export(uri, "masks", to=str(tmp_path / "masks")).images == 3
    for key, labels in maps.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / f"{key}.png")), labels)
    pictured = review(uri, lowest=3)
    assert len(pictured.overlays) == 3 and pictured.unreadable == []
