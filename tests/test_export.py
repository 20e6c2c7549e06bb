"""`export`: COCO, YOLO segmentation and label-map PNGs, round-tripped against hand-drawn class maps (more rows than
one read batch, over several labels files, with error rows among them); then a real job's output on S3 whose inputs
were WebDataset shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from xml.etree import ElementTree

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import supervision as sv
import yaml
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from pycocotools import mask as coco_mask
from test_job import encoded, picture
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


@pytest.fixture(scope="module", params=["local", "s3"])
def output(request, tmp_path_factory) -> tuple[str, dict, dict[str, np.ndarray]]:
    """A job output of 150 ok rows of hand-drawn maps in three labels files, and 5 error rows; the images are there
    (`source`), beside the output. Made once for the module: no test writes into it but under `export/`."""
    if request.param == "local":
        uri, options = str(tmp_path_factory.mktemp("export") / "out"), {}
    else:  # a bucket of its own, shared by this module's tests (each exports somewhere else)
        options = request.getfixturevalue("s3_server")
        fsspec.filesystem("s3", **options).mkdir("export-tests")
        uri = "s3://export-tests/out"
    maps = {f"day/{i:03d}.jpg": scene(i)[0] for i in range(150)}
    write_output(uri, options, maps, errors=5)
    return uri, options, maps


def write_output(uri: str, options: dict, maps: dict[str, np.ndarray], errors: int = 0) -> None:
    """A job output of an ok row per class map (in files of 52 rows) and `errors` error rows, with a picture per
    key in `images/` beside it, the rows' `source`."""
    fs, root = fsspec.core.url_to_fs(uri, **options)
    images = f"{root.rpartition('/')[0]}/images"
    for i, (key, labels) in enumerate(maps.items()):
        fs.makedirs(f"{images}/{key}".rpartition("/")[0], exist_ok=True)
        image_format = "PNG" if key.endswith(".png") else "JPEG"
        fs.pipe_file(f"{images}/{key}", encoded(picture(i, labels.shape[::-1]), image_format))
    rows = [
        {
            **result(key),
            "source": fs.unstrip_protocol(f"{images}/{key}"),
            "width": labels.shape[1],
            "height": labels.shape[0],
            "mask": encode_png(labels, build_palette(2)),
        }
        for key, labels in maps.items()
    ]
    rows += [result(f"broken/{i}.jpg", ok=False) for i in range(errors)]
    writer = LabelWriter(uri, options, png=False)
    for start in range(0, len(rows), 52):
        writer(batch(rows[start : start + 52]))
    write_job_files(uri, options, {"classes": CLASSES}, success=True)


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
    for key, labels in maps.items():  # day/000.jpg -> day/000.png, as mmsegmentation and Detectron2 pair them
        assert np.array_equal(np.asarray(Image.open(fs.open(f"{root}/{key.removesuffix('.jpg')}.png"))), labels)

    to = str(tmp_path / "discs")
    summary = export(uri, "masks", to=to, classes=["disc"], min_area=1, names="key", storage_options=options)
    assert summary.regions == 150 * 2
    for key, labels in maps.items():
        assert np.array_equal(np.asarray(Image.open(f"{to}/{key}.png")), np.where(labels == 2, 2, 0))


def ultralytics_pairs(data_yaml: str) -> dict[str, list[tuple[str, str]]]:
    """(image, label) paths per split, found the way Ultralytics documents it (its `check_det_dataset` and
    `img2label_paths`; `ultralytics` itself cannot be imported beside the CPU torch wheel, as it needs torchvision):
    `train` and `val` are required, resolved against `path` (or the YAML's folder); a label is the image's path with
    its last `/images/` made `/labels/` and its extension `.txt`."""
    data = yaml.safe_load(open(data_yaml))
    assert data.get("train") and data.get("val") and data.get("names"), data
    root = Path(data.get("path") or Path(data_yaml).parent)
    assert root.is_absolute()  # a relative `path` would be taken relative to Ultralytics' DATASETS_DIR
    pairs = {}
    for split in ("train", "val"):
        folder = (root / data[split]).resolve()
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower()[1:] in ULTRALYTICS_IMAGE_FORMATS)
        labels = [
            f"{os.sep}labels{os.sep}".join(str(p).rsplit(f"{os.sep}images{os.sep}", 1)).rsplit(".", 1)[0] + ".txt"
            for p in images
        ]
        pairs[split] = list(zip(map(str, images), labels))
    return pairs


ULTRALYTICS_IMAGE_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"}


def test_yolo_seg_is_a_dataset_ultralytics_and_supervision_read(output, tmp_path):
    uri, options, maps = output
    to = str(tmp_path / "yolo")
    summary = export(uri, "yolo-seg", to=to, min_area=20, val_fraction=0.3, seed=1, storage_options=options)
    assert summary.regions == 150 * 4  # the specks go

    data = yaml.safe_load(open(f"{to}/data.yaml"))
    assert data == {"path": to, "train": "images/train", "val": "images/val", "names": {0: "bar", 1: "disc"}}
    pairs = ultralytics_pairs(f"{to}/data.yaml")
    keys = {
        split: sorted(str(Path(image).relative_to(f"{to}/images/{split}")) for image, _ in found)
        for split, found in pairs.items()
    }
    assert sorted(keys["train"] + keys["val"]) == sorted(maps)  # each image once, with its key as its name
    assert 0.15 < len(keys["val"]) / len(maps) < 0.45  # about 30 %
    for split, found in pairs.items():
        for image, label in found:
            assert os.path.isfile(label), label  # every image has its label where Ultralytics looks
            key = str(Path(image).relative_to(f"{to}/images/{split}"))
            assert np.asarray(Image.open(image)).shape[:2] == maps[key].shape  # the image itself, copied

    for split in ("train", "val"):  # supervision reads it back (a folder at a time); each polygon covers its region
        dataset = sv.DetectionDataset.from_yolo(
            images_directory_path=f"{to}/images/{split}/day",
            annotations_directory_path=f"{to}/labels/{split}/day",
            data_yaml_path=f"{to}/data.yaml",
            force_masks=True,
        )
        assert dataset.classes == ["bar", "disc"] and len(dataset) == len(keys[split])
        for path, _, detections in dataset:
            labels = maps[str(Path(path).relative_to(f"{to}/images/{split}"))]
            assert sorted(detections.class_id.tolist()) == [0, 0, 1, 1]
            for mask, number in zip(detections.mask, detections.class_id):
                class_pixels = labels == number + 1
                region = _component_of(class_pixels, mask & class_pixels)
                if region.sum() > 100:
                    iou = (mask & region).sum() / (mask | region).sum()
                    assert iou >= 0.95, (path, number, iou)

    again = str(tmp_path / "again")  # the split is the same in another export with the same seed
    export(uri, "yolo-seg", to=again, val_fraction=0.3, seed=1, storage_options=options)
    assert (
        sorted(str(p.relative_to(f"{again}/images/val")) for p in Path(f"{again}/images/val").rglob("*.jpg"))
        == (keys["val"])
    )


def test_keys_that_share_a_stem_keep_their_key_and_images_can_be_linked(tmp_path, capsys):
    """`a.jpg` and `a.png` would both be `a.png` (masks) or `a.txt` (YOLO): they keep their whole key, and the
    export says so. The YOLO images are links to the sources (`--images link`, through the CLI); COCO is read back
    by supervision, every pixel."""
    uri = str(tmp_path / "out")
    maps = {key: scene(i)[0] for i, key in enumerate(["a.jpg", "a.png", "sub/b.jpg", "sub/b.jpeg.jpg"])}
    write_output(uri, {}, maps)

    summary = export(uri, "masks", to=str(tmp_path / "masks"))
    assert summary.named_by_key == ["a.jpg", "a.png"]
    assert "2 keys share a stem with another key, named by the whole key: a.jpg, a.png" in str(summary)
    written = sorted(str(p.relative_to(tmp_path / "masks")) for p in (tmp_path / "masks").rglob("*.png"))
    assert written == ["a.jpg.png", "a.png.png", "sub/b.jpeg.png", "sub/b.png"]
    for key, name in [("a.jpg", "a.jpg"), ("a.png", "a.png"), ("sub/b.jpg", "sub/b"), ("sub/b.jpeg.jpg", "sub/b.jpeg")]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / f"{name}.png")), maps[key])

    to = tmp_path / "yolo"
    assert cli(["export", uri, "--format", "yolo-seg", "--images", "link", "--to", str(to)]) == 0
    assert "2 keys share a stem" in capsys.readouterr().out
    pairs = ultralytics_pairs(str(to / "data.yaml"))
    assert pairs["train"] == pairs["val"]  # no split: both are the one folder
    found = {str(Path(image).relative_to(to / "images" / "train")): label for image, label in pairs["train"]}
    assert sorted(found) == ["a.jpg.jpg", "a.png.png", "sub/b.jpeg.jpg", "sub/b.jpg"]
    for name, label in found.items():
        assert os.path.isfile(label) and os.path.islink(to / "images" / "train" / name)
    assert os.readlink(to / "images" / "train" / "a.png.png") == str(tmp_path / "images" / "a.png")

    assert export(uri, "coco", to=str(tmp_path / "coco")).images == 4
    dataset = sv.DetectionDataset.from_coco(
        images_directory_path=str(tmp_path / "images"),
        annotations_path=str(tmp_path / "coco" / "instances.json"),
        force_masks=True,
    )
    assert len(dataset) == 4
    for path, _, detections in dataset:
        labels = maps[str(Path(path).relative_to(tmp_path / "images"))]
        painted = np.zeros_like(labels)
        for mask, class_id in zip(detections.mask, detections.class_id):
            painted[mask] = CLASSES.index(dataset.classes[class_id])  # the job's class id of supervision's class
        assert np.array_equal(painted, labels)


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
        assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / f"{key[:-4]}.png")), labels)
    pictured = review(uri, lowest=3)
    assert len(pictured.overlays) == 3 and pictured.unreadable == []


def ls_regions(task: dict) -> np.ndarray:
    """The class map a Label Studio task's brush predictions paint, each region decoded by the SDK's own decoder."""
    (prediction,) = task["predictions"]
    first = prediction["result"][0]
    union = np.zeros((first["original_height"], first["original_width"]), np.uint8)
    for region in prediction["result"]:
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "label", "image")
        assert region["value"]["format"] == "rle" and region["image_rotation"] == 0
        shape = (region["original_height"], region["original_width"])
        pixels = np.reshape(decode_rle(region["value"]["rle"]), (*shape, 4))[:, :, 3] > 0
        assert not union[pixels].any()  # regions never overlap
        (name,) = region["value"]["brushlabels"]
        union[pixels] = CLASSES.index(name)
    return union


def test_label_studio_tasks_decode_to_the_class_maps_with_its_sdk(output):
    """Every pixel of every region through `label_studio_sdk.converter.brush.decode_rle`; local images get
    local-files URLs under the document root, S3 ones their URI; the labelling config names the classes."""
    uri, options, maps = output
    local = not uri.startswith("s3://")
    root = str(Path(uri).parent) if local else None
    summary = export(uri, "label-studio", local_files_root=root, storage_options=options)

    assert (summary.images, summary.skipped, summary.regions) == (150, 5, 150 * 5)
    tasks = read_json(f"{uri}/export/label-studio/tasks.json", options)
    assert sorted(task["data"]["key"] for task in tasks) == sorted(maps)
    for task in tasks:
        key = task["data"]["key"]
        assert task["data"]["image"] == (
            f"/data/local-files/?d=images/{key}" if local else f"s3://export-tests/images/{key}"
        )
        assert np.array_equal(ls_regions(task), maps[key])
        assert task["predictions"][0]["model_version"] == "seggpt-test" and task["predictions"][0]["score"] == 0.75
    with fsspec.open(f"{uri}/export/label-studio/labeling_config.xml", "r", **options) as file:
        config = ElementTree.fromstring(file.read())
    assert config.find("Image").get("name") == "image" and config.find("BrushLabels").get("toName") == "image"
    assert [label.get("value") for label in config.iter("Label")] == ["bar", "disc"]


def test_label_studio_sends_the_lowest_images_of_a_class_and_copies_shard_members(tmp_path, capsys):
    """`--lowest 3 --class disc` through the CLI: the three images whose disc scores lowest (not the lowest overall);
    images inside a tar shard are copied beside the tasks and addressed under the local-files root."""
    maps = {f"s.tar/{i}.jpg": scene(i)[0] for i in range(8)}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, (key, labels) in enumerate(maps.items()):
            data = encoded(picture(i, labels.shape[::-1]))
            info = tarfile.TarInfo(key.split("/", 1)[1])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    disc_scores = [0.9, 0.2, 0.8, 0.1, 0.7, 0.3, 0.6, 0.95]  # lowest: 3, 1, 5
    rows = [
        {
            **result(key),
            "source": f"file://{tmp_path}/s.tar",
            "width": labels.shape[1],
            "height": labels.shape[0],
            "mask": encode_png(labels, build_palette(2)),
            "class_ids": [0, 1, 2],
            "class_scores": [0.99, 0.5, disc_scores[i]],
            "score": 0.05 if i == 7 else 0.5,  # the lowest overall, but not by disc
        }
        for i, (key, labels) in enumerate(maps.items())
    ]
    uri = str(tmp_path / "out")
    LabelWriter(uri, {}, png=False)(batch(rows))
    write_job_files(uri, {}, {"classes": CLASSES, "palette": build_palette(2).tolist()}, success=True)
    to = tmp_path / "ls"

    args = ["export", uri, "--format", "label-studio", "--lowest", "3", "--class", "disc", "--to", str(to)]
    assert cli([*args, "--local-files-root", str(tmp_path)]) == 0
    assert "exported 3 images" in capsys.readouterr().out
    tasks = json.loads((to / "tasks.json").read_text())
    assert [task["data"]["key"] for task in tasks] == ["s.tar/1.jpg", "s.tar/3.jpg", "s.tar/5.jpg"]
    for task in tasks:
        key = task["data"]["key"]
        assert task["data"]["image"] == f"/data/local-files/?d=ls/images/{key}"
        assert (to / "images" / key).read_bytes() == tarfile.open(tmp_path / "s.tar").extractfile(key[6:]).read()
        assert np.array_equal(ls_regions(task), maps[key])
        discs = [r for r in task["predictions"][0]["result"] if r["value"]["brushlabels"] == ["disc"]]
        assert {r["score"] for r in discs} == {disc_scores[int(key[6])]}
    config = ElementTree.fromstring((to / "labeling_config.xml").read_text())
    colours = [label.get("background") for label in config.iter("Label")]
    assert colours == ["#" + bytes(colour).hex() for colour in build_palette(2)[1:].tolist()]

    assert cli([*args[:-2], "--to", str(tmp_path / "elsewhere"), "--local-files-root", str(tmp_path / "other")]) == 2
    assert "--local-files-root: " in capsys.readouterr().err


def test_a_coco_export_reads_back_as_a_labelled_pool(tmp_path):
    """The way back: COCO (ours, RLE) and a CVAT-style one (polygons, its own category ids, `annotations/` beside
    `images/`) are labelled pools, and truth for `evaluate`; categories become class ids by name, images are found
    beside the JSON."""
    from pipeline.results import evaluate
    from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_pairs

    uri = str(tmp_path / "out")
    maps = {f"day/{i:03d}.jpg": scene(i)[0] for i in range(20)}
    write_output(uri, {}, maps)
    export(uri, "coco", to=str(tmp_path))  # instances.json beside images/
    source = LabelledSource(str(tmp_path / "instances.json"), classes=("bar", "disc"))
    items = labelled_pairs(source, {}, 2)
    pairs = {pair["key"]: pair for pair in read_pairs(items, source, {})}
    assert sorted(pairs) == sorted(maps)
    for key, pair in pairs.items():
        assert not pair["error"] and pair["image"] == (tmp_path / "images" / key).read_bytes()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(pair["mask"]))), maps[key])  # every pixel
    scores = evaluate(uri, str(tmp_path / "instances.json"))  # and as evaluate's truth: the labels, exactly
    assert scores.iou[1:] == [1.0, 1.0] and scores.compared == 20 and scores.without_truth == 0 and not scores.missing

    cvat = tmp_path / "cvat"
    (cvat / "annotations").mkdir(parents=True)
    (cvat / "images").mkdir()
    Image.new("RGB", (40, 30)).save(cvat / "images" / "a.png")
    coco = {
        "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "bar"}, {"id": 3, "name": "cat"}],
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [[30, 20, 38, 20, 38, 28, 30, 28]]},
            {"id": 3, "image_id": 7, "category_id": 3, "segmentation": [[0, 25, 5, 25, 5, 29, 0, 29]]},
        ],
    }
    (cvat / "annotations" / "instances_default.json").write_text(json.dumps(coco))
    source = LabelledSource(str(cvat / "annotations" / "instances_default.json"), classes=("bar", "disc"))
    (pair,) = read_pairs(labelled_pairs(source, {}, 2), source, {})
    labels = np.asarray(Image.open(io.BytesIO(pair["mask"])))
    bar, disc = np.argwhere(labels == 1), np.argwhere(labels == 2)
    assert set(np.unique(labels)) == {0, 1, 2}  # "cat" is none of the classes: background
    assert (bar.min(0).tolist(), bar.max(0).tolist()) == ([4, 4], [13, 23])  # rows 4..13, columns 4..23
    assert (disc.min(0).tolist(), disc.max(0).tolist()) == ([20, 30], [27, 37])
