"""Prompts better than a person picks: `select-prompts` and `tune` on a synthetic pool on a real S3 server, checked
against the model package run by hand; and the labelling job with a tuned prompt file."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors

from jobs.cli import main as cli
from model import load_model
from model.processing import (
    build_palette,
    decode_png,
    masks_to_class_ids,
    prepare_image,
    prepare_mask,
    upsample_class_map,
)
from pipeline.labelling.job import autolabel
from pipeline.prompts.select import default_val_fraction, keep_step
from pipeline.prompts.sets import tuned_prompt_bytes
from pipeline.results.metrics import Evaluation
from pipeline.training.synthetic import random_task, render

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "jobs" / "demo" / "checkpoint"  # the bundled trained model
CLASSES = ["a", "b", "c"]
SEED, VAL_FRACTION = 0, 0.4
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
PALETTE = np.array([[0, 0, 0], [255, 255, 255], [255, 255, 127], [255, 127, 255]], np.uint8)  # classes 0..3


@pytest.fixture(scope="module")
def pool(tmp_path_factory, s3_server) -> tuple[str, dict, Path]:
    """40 images of one 3-class task, each class shown with probability 0.4, on S3 and on local disk:
    (s3 URI, storage options, local folder)."""
    local = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(SEED)
    task = random_task(rng, 3)
    for i in range(40):
        image, labels = render(task, rng, (64, 64), presence=0.4)
        Image.fromarray(image).save(local / f"img{i:03d}.png")  # a PNG image: its mask is NAME.mask.png
        Image.fromarray(labels).save(local / f"img{i:03d}.mask.png")
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("pool")
    fs.put(f"{local}/", "pool/data/", recursive=True)
    return "s3://pool/data", s3_server, local


def _validation_keys(local: Path) -> list[str]:
    """The held-out keys, computed here from the rule: the fraction of the keys (rounded) whose sha256 of "seed:key"
    is smallest."""

    def share(key: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{SEED}:{key}".encode()).digest()[:8], "big") / 2**64

    names = [path.name for path in sorted(local.glob("img???.png"))]
    return sorted(sorted(names, key=share)[: round(VAL_FRACTION * len(names))])


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, H, W) float32 as the model takes it, by hand."""
    return torch.from_numpy(((pixels / 255 - MEAN) / STD).astype(np.float32).transpose(2, 0, 1))


def _mean_iou(images: torch.Tensor, masks: torch.Tensor, local: Path, keys: list[str]) -> float:
    """Mean IoU over the classes of the prompt set (images, masks) on `keys`, through the model package."""
    model = load_model(str(CHECKPOINT))
    k = len(images)
    inter, union = np.zeros(4), np.zeros(4)
    for key in keys:
        pixels = _normalised(np.asarray(Image.open(local / key)))[None].repeat(k, 1, 1, 1)
        pred = model.predict(pixels, images, masks, num_prompts=k, embedding_type="semantic")
        ids = masks_to_class_ids(pred, torch.from_numpy(PALETTE))[0][0].numpy()
        truth = np.asarray(Image.open(local / key.replace(".png", ".mask.png")))
        for c in range(1, 4):
            inter[c] += ((ids == c) & (truth == c)).sum()
            union[c] += ((ids == c) | (truth == c)).sum()
    return float(np.mean([inter[c] / union[c] for c in range(1, 4) if union[c]]))


def test_select_prompts_writes_its_best_step_which_beats_random_sets_and_the_best_single(pool, ray_session, capsys):
    uri, options, local = pool
    assert (
        cli(
            [
                "select-prompts",
                uri,
                "--checkpoint",
                str(CHECKPOINT),
                "--k",
                "3",
                "--classes",
                ",".join(CLASSES),
                "--val-fraction",
                str(VAL_FRACTION),
                "--candidates",
                "8",
                "--random-draws",
                "4",
                "--seed",
                str(SEED),
                "--to",
                "s3://pool/selected",
                "--storage-options",
                json.dumps(options),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "step 3: + img" in printed and "best single: img" in printed and "random 3-sets (mean of 4)" in printed
    fs = s3fs.S3FileSystem(**options)
    report = json.loads(fs.cat_file("pool/selected/report.json"))
    steps, kept = report["steps"], report["kept"]["step"]
    assert len(steps) == 3 and all(step["interval"][0] <= step["mean_iou"] <= step["interval"][1] for step in steps)
    # The step kept is the best one (here the third, measurably above the others)
    scores_by_step = [step["mean_iou"] for step in steps]
    assert kept == 1 + int(np.argmax(scores_by_step)) and "every step before it scored measurably lower" in printed
    assert f"kept step {kept}: the highest validation mean IoU, {max(scores_by_step):.3f}" in printed
    chosen = steps[kept - 1]["mean_iou"]
    assert chosen > report["random"]["mean_iou"] and chosen > report["best_single"]["mean_iou"]
    assert len(report["random"]["draws_mean_iou"]) == 4 and report["counts"]["validation"] == len(
        _validation_keys(local)
    )
    # 16 validation images: too few to tell the candidates apart, and it says so
    assert report["warnings"] and "16 validation images" in report["warnings"][0] and "warning: 16" in printed
    # The random baseline per class is the mean over the draws of each draw's own class IoU, as its mean IoU is
    sets = report["random"]["sets"]
    assert report["random"]["mean_iou"] == pytest.approx(np.mean([draw["mean_iou"] for draw in sets]))
    for name in CLASSES:
        assert report["random"]["iou"][name] == pytest.approx(np.mean([draw["iou"][name] for draw in sets]))

    # The prompt folder written: the kept steps' pairs, whose validation mean IoU, run here through the model package
    # on the keys held out by the rule, is the one reported.
    names = report["chosen"]
    assert [name.split("-", 1)[1] + ".png" for name in names] == [step["key"] for step in steps[:kept]]
    assert sorted(fs.ls("pool/selected", detail=False)) == sorted(
        [f"pool/selected/{name}{suffix}" for name in names for suffix in (".png", ".mask.png")]
        + ["pool/selected/report.json"]
    )
    images, labels = (
        [np.asarray(Image.open(io.BytesIO(fs.cat_file(f"pool/selected/{name}{suffix}")))) for name in names]
        for suffix in (".png", ".mask.png")
    )
    for name, image, label in zip(names, images, labels):  # the pool's own pixels
        key = name.split("-", 1)[1]
        assert np.array_equal(image, np.asarray(Image.open(local / f"{key}.png")))
        assert np.array_equal(label, np.asarray(Image.open(local / f"{key}.mask.png")))
    prompt_images = torch.stack([_normalised(image) for image in images])
    prompt_masks = torch.stack([_normalised(PALETTE[label]) for label in labels])
    assert _mean_iou(prompt_images, prompt_masks, local, _validation_keys(local)) == pytest.approx(chosen, abs=1e-9)

    # With --k 2 on this pool the second prompt lowers the score: the set written is step 1's alone, never step 2's.
    assert (
        cli(
            [
                "select-prompts",
                uri,
                "--checkpoint",
                str(CHECKPOINT),
                "--k",
                "2",
                "--classes",
                ",".join(CLASSES),
                "--val-fraction",
                str(VAL_FRACTION),
                "--candidates",
                "8",
                "--random-draws",
                "1",
                "--seed",
                str(SEED),
                "--to",
                "s3://pool/selected2",
                "--storage-options",
                json.dumps(options),
            ]
        )
        == 0
    )
    report = json.loads(fs.cat_file("pool/selected2/report.json"))
    first, second = (step["mean_iou"] for step in report["steps"])
    assert second < first and report["kept"] == {
        "step": 1,
        "why": f"the highest validation mean IoU, {first:.3f}; later steps scored lower",
    }
    assert report["chosen"] == ["1-" + report["steps"][0]["key"].removesuffix(".png")]
    name = report["chosen"][0]
    assert sorted(fs.ls("pool/selected2", detail=False)) == [
        f"pool/selected2/{name}.mask.png",
        f"pool/selected2/{name}.png",
        "pool/selected2/report.json",
    ]


def _evaluation(per_image: list[list[int]]) -> Evaluation:
    """An `Evaluation` of one foreground class from per-image (intersection, union) pixel counts."""
    counts = {f"k{i}": np.array([[0, both], [0, either], [0, either]]) for i, (both, either) in enumerate(per_image)}
    return Evaluation.of(["background", "a"], counts, compared=len(counts))


def test_keep_step_takes_fewer_prompts_only_within_noise():
    rng = np.random.default_rng(0)
    base = [[int(b), 100] for b in rng.integers(40, 60, 30)]
    same = [[b + change, u] for (b, u), change in zip(base, [3, 3, -2, -2] + [0] * 26)]  # a hair better: noise
    better = [[b + 20, u] for b, u in base]  # 20 more on every image: measurably better
    worse = [[b - 30, u] for b, u in base]
    assert keep_step([_evaluation(base), _evaluation(better), _evaluation(worse)], seed=0)["step"] == 2
    assert _evaluation(same).mean_iou > _evaluation(base).mean_iou
    tied = keep_step([_evaluation(base), _evaluation(same), _evaluation(worse)], seed=0)
    assert tied["step"] == 1 and "not measurably worse than step 2" in tied["why"]
    # the hand-computed means: every image's union is 100, so the mean IoU is the summed intersections over 3000
    assert _evaluation(better).mean_iou == pytest.approx(sum(b for b, _ in better) / 3000)


def test_default_validation_share_for_pools_of_10_to_10000():
    assert [round(default_val_fraction(n) * n) for n in (10, 100, 1000, 10_000)] == [3, 30, 300, 300]


def test_tune_raises_training_miou_keeps_validation_and_resumes(pool, ray_session, tmp_path, capsys):
    uri, options, local = pool
    start_folder = tmp_path / "start"
    start_folder.mkdir()
    for suffix in (".png", ".mask.png"):
        (start_folder / f"img019{suffix}").write_bytes((local / f"img019{suffix}").read_bytes())
    config = {
        "model": {"checkpoint": str(CHECKPOINT)},
        "prompt": {"uri": str(start_folder), "classes": CLASSES},  # one pool image, as a prompt folder has it
        "data": {"uri": uri, "val_fraction": VAL_FRACTION, "seed": SEED},
        "train": {"steps": 10, "batch_size": 8, "lr": 0.02, "log_every": 5, "checkpoint_every": 5},
        "output": {"uri": "s3://pool/tuned"},
        "compute": {"workers": 1, "cpus_per_worker": 1},
        "storage_options": options,
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["tune", str(path)]) == 0
    assert "tuned steps 0..10" in capsys.readouterr().out
    fs = s3fs.S3FileSystem(**options)
    report = json.loads(fs.cat_file("pool/tuned/tune_report.json"))
    training, validation = report["training"], report["validation"]
    curve = report["validation_by_step"]  # the starting prompt (step 0) and each checkpoint's, on validation
    assert sorted(curve, key=int) == ["0", "5", "10"] and curve["0"] == validation["before"]["mean_iou"]
    assert report["chosen_step"] > 0 and curve[str(report["chosen_step"])] == max(curve.values())
    assert training["after"]["mean_iou"] > training["before"]["mean_iou"]
    assert validation["after"]["mean_iou"] >= validation["before"]["mean_iou"]
    assert validation["after"]["images"] == len(_validation_keys(local))

    # The tuned file: the classes and palette it was tuned for; its validation mean IoU, run here, is the one reported.
    data = fs.cat_file("pool/tuned/tuned.safetensors")
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert json.loads(metadata["classes"]) == CLASSES and json.loads(metadata["palette"]) == PALETTE.tolist()
    tensors = load_safetensors(data)
    assert tensors["image"].shape == tensors["mask"].shape == (3, 64, 64)
    start = np.asarray(Image.open(local / "img019.png"))
    assert not torch.equal(tensors["image"], _normalised(start))  # it moved
    assert _mean_iou(tensors["image"][None], tensors["mask"][None], local, _validation_keys(local)) == pytest.approx(
        validation["after"]["mean_iou"], abs=1e-9
    )

    # More steps: it resumes from step 10 and continues the log.
    assert cli(["tune", str(path), "--set", "train.steps=12", "--set", "train.log_every=1"]) == 0
    assert "tuned steps 10..12" in capsys.readouterr().out
    log = [json.loads(line) for line in fs.cat_file("pool/tuned/train_log.jsonl").decode().splitlines()]
    assert [record["step"] for record in log] == [5, 10, 11, 12]
    assert fs.exists("pool/tuned/checkpoint-0000012/prompt.safetensors")


def test_a_job_with_a_tuned_prompt_file_gives_the_model_packages_maps(tmp_path):
    """A prompt folder of the demo's first pair and a tuned prompt file: the job's class maps are the model package's
    own, given the same tensors; `_job.json` says which prompt is which."""
    model = load_model(str(CHECKPOINT))
    size = model.config.input_size
    demo = REPO / "jobs" / "demo"
    classes = json.loads((demo / "classes.json").read_text())
    palette = build_palette(len(classes))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for suffix in (".jpg", ".png"):
        (prompts / f"prompt0{suffix}").write_bytes((demo / "prompts" / f"prompt0{suffix}").read_bytes())

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        image = prepare_image(Image.open(demo / "prompts" / f"{name}.jpg"), size)
        mask = prepare_mask(
            Image.open(demo / "prompts" / f"{name}.png"), size, mask_format="labels", num_labels=len(classes)
        )
        return _normalised(image), _normalised(mask)

    pair_image, pair_mask = pair("prompt0")
    tuned_image, tuned_mask = pair("prompt1")
    tuned_image += torch.from_numpy(np.random.default_rng(3).normal(0, 0.1, (3, *size)).astype(np.float32))
    (prompts / "tuned.safetensors").write_bytes(
        tuned_prompt_bytes(tuned_image, tuned_mask, classes=classes, embedding="semantic")
    )
    summary = autolabel(
        {
            "input": {"uri": str(demo / "images")},
            "prompts": {"uri": str(prompts), "classes": classes},
            "model": {"checkpoint": str(CHECKPOINT)},
            "output": {"uri": str(tmp_path / "out")},
            "compute": {"batch_size": 4},
        },
        log=lambda line: None,
    )
    assert (summary.ok, summary.error) == (12, 0)
    info = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert info["prompt_kinds"] == {"prompt0": "pair", "tuned": "tuned"}

    images, masks = torch.stack([pair_image, tuned_image]), torch.stack([pair_mask, tuned_mask])
    for path in sorted((demo / "images").glob("*.jpg")):
        picture = Image.open(path)
        pixels = _normalised(prepare_image(picture, size))[None].repeat(2, 1, 1, 1)
        pred = model.predict(pixels, images, masks, num_prompts=2, embedding_type="semantic")
        ids = masks_to_class_ids(pred, torch.from_numpy(palette))[0][0].numpy()
        labelled = decode_png((tmp_path / "out" / "masks" / f"{path.name}.png").read_bytes())
        assert np.array_equal(labelled, upsample_class_map(ids, (picture.height, picture.width))), path.name
