"""Every config option's non-default value, run through the whole job on local Ray.

Each run changes one option or a few, and checks the rows against what the model package, PIL or a hand-computed
fact says, never against pipeline code: the prompt tensors are built here from the prompt files with `prepare_image`
and `prepare_mask`, as the README describes a prompt set. Where a test can show that an option matters, it does so
against one default run over the same images (`baseline`) or with inputs on which ignoring the option would fail.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import ExifTags, Image
from test_job import CLASSES, TINY, encoded, job_config, make_assets, picture, read_labels

from model import SegGpt, load_model
from model.processing import (
    build_palette,
    decode_png,
    masks_to_class_ids,
    normalize,
    prepare_image,
    prepare_mask,
    upsample_class_map,
)
from model.seggpt import Attention
from pipeline.labelling.infer import SegGptPredictor
from pipeline.labelling.job import autolabel
from pipeline.prompts.sets import load_prompt_set
from pipeline.storage.output import OutputError
from pipeline.storage.retry import Retry

# build_palette(2) by the README's rule: base = int(2 ** (1/3)) + 1 = 2, margin 256 // 2 = 128; class i >= 1 is
# 255 - 128 * (digits of i - 1 in base 2): class 1 -> (0, 0, 0) -> white, class 2 -> (0, 0, 1) -> (255, 255, 127).
PALETTE = np.array([[0, 0, 0], [255, 255, 255], [255, 255, 127]], np.uint8)
ROTATED = "rotated.jpg"  # 40x24 as stored, EXIF Orientation 6: shown turned 90 degrees clockwise, 24x40
COUNT = 12  # more than one batch of 2: the actor pool gets work to scale to


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """COUNT loose JPEGs, one of them with an EXIF orientation; returns (folder, {key: encoded image})."""
    folder = tmp_path_factory.mktemp("data")
    images = {f"img{i:02d}.jpg": encoded(picture(200 + i, (20 + 3 * i, 45 - 2 * i))) for i in range(COUNT - 1)}
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    picture(300, (40, 24)).save(buffer, format="JPEG", exif=exif)
    images[ROTATED] = buffer.getvalue()
    for key, data in images.items():
        (folder / key).write_bytes(data)
    return folder, images


@pytest.fixture(scope="module")
def baseline(assets, dataset, tmp_path_factory, ray_session) -> tuple[Path, dict[str, dict]]:
    """The job with every option at its default over `dataset`: (output folder, {key: row})."""
    output = tmp_path_factory.mktemp("baseline") / "out"
    summary = autolabel(job_config(assets, str(dataset[0]), str(output), {}))
    assert (summary.ok, summary.error) == (COUNT, 0)
    return output, rows_by_key(output)


def rows_by_key(output: Path) -> dict[str, dict]:
    rows = read_labels(str(output), {}).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a key is in labels/ more than once"
    return {row["key"]: row for row in rows}


def run_job(assets: Path, input_uri: str, destination: Path, **options: dict) -> dict[str, dict]:
    """Run the job with `options` ({section: {key: value}}) over test_job's config; returns {key: row}."""
    config = job_config(assets, input_uri, str(destination), {})
    for section, values in options.items():
        config[section].update(values)
    autolabel(config)
    return rows_by_key(destination)


@functools.cache
def model_of(checkpoint: str, dtype: str) -> SegGpt:
    """The model package's model in `dtype`, with the attention `auto` picks for it on the CPU (as the job does)."""
    return load_model(checkpoint, dtype=dtype).set_attention("auto")


def prompt_tensors(prompts: Path, size: tuple[int, int], mask_format: str = "labels") -> tuple[np.ndarray, ...]:
    """uint8 (K, H, W, 3) prompt images and colour masks, built from the files p0, p1 with the model package."""
    images, masks = [], []
    for name in ("p0", "p1"):
        images.append(prepare_image(Image.open(prompts / f"{name}.jpg"), size))
        num_labels = len(CLASSES) if mask_format == "labels" else None
        masks.append(
            prepare_mask(Image.open(prompts / f"{name}.png"), size, mask_format=mask_format, num_labels=num_labels)
        )
    return np.stack(images), np.stack(masks)


@torch.inference_mode()
def model_map(
    assets: Path,
    image: Image.Image,
    *,
    embedding: str = "semantic",
    dtype: str = "float32",
    prompts: tuple[np.ndarray, np.ndarray] | None = None,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The model package's class map for one PIL image taken as it is (no EXIF handling), at its size (or at
    `shape`, (height, width))."""
    model = model_of(str(assets / "checkpoint"), dtype)
    size = model.config.input_size
    images, masks = prompt_tensors(assets / "prompts", size) if prompts is None else prompts
    k, torch_dtype = len(images), getattr(torch, dtype)
    pixels = torch.from_numpy(prepare_image(image, size, exif_transpose=False))[None].repeat(k, 1, 1, 1)
    images, masks = (normalize(torch.from_numpy(array), torch_dtype) for array in (images, masks))
    pred = model.predict(normalize(pixels, torch_dtype), images, masks, num_prompts=k, embedding_type=embedding)
    ids, _ = masks_to_class_ids(pred, torch.from_numpy(PALETTE))
    return upsample_class_map(ids[0].numpy(), shape or (image.height, image.width))


def shown(data: bytes) -> Image.Image:
    """The image as a viewer shows it; only ROTATED carries an orientation (6: turn 90 degrees clockwise)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.transpose(Image.Transpose.ROTATE_270) if image.getexif().get(ExifTags.Base.Orientation) else image


def check_row(row: dict, expected: np.ndarray) -> None:
    """An ok row whose mask, size, class ids, pixel counts and score fit the expected class map."""
    assert row["status"] == "ok" and row["error"] is None, row["error"]
    assert (row["height"], row["width"]) == expected.shape
    class_map = decode_png(row["mask"])
    assert np.array_equal(class_map, expected), row["key"]
    counts = np.bincount(expected.ravel(), minlength=len(PALETTE))
    assert row["class_ids"] == np.flatnonzero(counts).tolist()
    assert row["pixel_counts"] == counts[counts > 0].tolist()
    assert 0 <= row["score"] <= 1
    assert len(row["class_scores"]) == len(row["class_ids"]) and all(0 <= v <= 1 for v in row["class_scores"])


def test_baseline_is_what_the_model_gives(assets, dataset, baseline):
    """The default run, the reference point of every other test: masks written, EXIF applied, semantic, float32."""
    output, rows = baseline
    assert sorted(rows) == sorted(dataset[1])
    for key, data in dataset[1].items():
        check_row(rows[key], model_map(assets, shown(data)))
        assert rows[key]["mask_uri"] and (output / "masks" / f"{key}.png").read_bytes() == rows[key]["mask"]
    assert (rows[ROTATED]["width"], rows[ROTATED]["height"]) == (24, 40)
    assert np.array_equal(build_palette(len(CLASSES)), PALETTE)
    job = json.loads((output / "_job.json").read_text())  # what `auto` settled on, and what the actors ran
    assert {key: job["compute"][key] for key in ("gpus_per_actor", "dtype", "attention")} == {
        "gpus_per_actor": 0.0,
        "dtype": "float32",
        "attention": "sdpa",
    }
    assert job["compute"]["reason"].startswith("the cluster has no GPUs")
    assert job["settings"] == {"dtype": "float32", "attention": "sdpa", "exif_transpose": True, "jpeg_draft": False}
    assert job["ran"] == [{"device": "cpu", "dtype": "float32", "attention": "sdpa", "images": COUNT}]
    assert {row["model"] for row in rows.values()} == {job["model_fingerprint"]} != {job["checkpoint_fingerprint"]}


def test_instance_embedding_exif_off_and_bfloat16(assets, dataset, baseline, tmp_path):
    """Three options in one run, each of which moves some pixels (so an ignored one would show):
    - `prompts.embedding: instance`: the model's instance-embedding maps;
    - `input.exif_transpose: false`: the stored pixels are labelled: raw width/height, the model on the raw image;
    - `model.dtype: bfloat16`: the model package's bfloat16 maps.
    It resumes a copy of the baseline's output with `output.on_mismatch: relabel`: every row is made again."""
    output = tmp_path / "out"
    shutil.copytree(baseline[0], output)
    rows = run_job(
        assets,
        str(dataset[0]),
        output,
        prompts={"embedding": "instance"},
        input={"exif_transpose": False},
        model={"dtype": "bfloat16"},
        output={"on_mismatch": "relabel"},
    )
    assert sorted(rows) == sorted(dataset[1])
    differ = {"semantic": 0, "float32": 0}
    for key, data in dataset[1].items():
        raw = Image.open(io.BytesIO(data))
        # Exact: on this CPU the bfloat16 result of an image does not depend on the batch it runs in.
        expected = model_map(assets, raw, embedding="instance", dtype="bfloat16")
        check_row(rows[key], expected)
        differ["semantic"] += not np.array_equal(expected, model_map(assets, raw, dtype="bfloat16"))
        differ["float32"] += not np.array_equal(expected, model_map(assets, raw, embedding="instance"))
    assert all(differ.values()), differ
    assert (rows[ROTATED]["width"], rows[ROTATED]["height"]) == (40, 24)
    assert (baseline[1][ROTATED]["width"], baseline[1][ROTATED]["height"]) == (24, 40)  # the default turns it
    assert decode_png(rows[ROTATED]["mask"]).shape == (24, 40)
    job = json.loads((output / "_job.json").read_text())
    assert job["config"]["prompts"]["embedding"] == "instance" and job["config"]["model"]["dtype"] == "bfloat16"
    assert job["config"]["input"]["exif_transpose"] is False
    assert (job["counts"]["ok"], job["counts"]["error"], job["counts"]["skipped"]) == (COUNT, 0, 0)
    assert (output / "_SUCCESS").exists()
    settings = {"dtype": "bfloat16", "attention": "chunked", "exif_transpose": False, "jpeg_draft": False}
    assert job["settings"] == settings  # `auto` attention: chunked for bfloat16 on the CPU
    assert job["ran"] == [{"device": "cpu", "dtype": "bfloat16", "attention": "chunked", "images": COUNT}]
    assert [run["settings"]["dtype"] for run in job["runs"]] == ["float32", "bfloat16"]
    assert {row["model"] for row in rows.values()} == {job["model_fingerprint"]}


def test_a_resume_under_other_settings_refuses(assets, dataset, baseline, tmp_path):
    """What made a label includes the settings that change its pixels: `model.dtype` as resolved, the attention
    backend, `input.exif_transpose` and `input.jpeg_draft`. A resume of the baseline's output under another value of
    any of them refuses before touching it, naming the settings of both; the same settings spelled out (`auto`
    settles on float32 and sdpa on this CPU) find every image done. Labels written before the settings were part of
    the fingerprint (their `model` is the checkpoint's alone) count as another model's."""
    output = tmp_path / "out"
    shutil.copytree(baseline[0], output)
    config = job_config(assets, str(dataset[0]), str(output), {})
    before = tree_digest(output)
    for section, key, value, text in (
        ("model", "dtype", "bfloat16", "dtype=bfloat16"),
        ("model", "attention", "flex", "attention=flex"),
        ("input", "exif_transpose", False, "exif_transpose=false"),
        ("input", "jpeg_draft", True, "jpeg_draft=true"),
    ):
        changed = {**config, section: {**config[section], key: value}}
        with pytest.raises(OutputError) as refused:
            autolabel(changed, log=lambda line: None)
        message = str(refused.value)
        assert f"{COUNT} labels there were made by model" in message and "output.on_mismatch=relabel" in message
        assert "attention=sdpa dtype=float32 exif_transpose=true jpeg_draft=false" in message and text in message
        assert tree_digest(output) == before, key

    spelled_out = {**config, "model": {**config["model"], "dtype": "float32", "attention": "sdpa"}}
    summary = autolabel(spelled_out, log=lambda line: None)
    assert (summary.ok, summary.error, summary.skipped) == (0, 0, COUNT)

    job = json.loads((output / "_job.json").read_text())
    for path in (output / "labels").glob("*.parquet"):  # as labels files were written before
        table = pq.read_table(path)
        old = pa.array([job["checkpoint_fingerprint"]] * table.num_rows, pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("model"), "model", old), path)
    with pytest.raises(
        OutputError,
        match=f"model {job['checkpoint_fingerprint']} with prompt set .*labelled before "
        "the settings were part of the model fingerprint",
    ):
        autolabel(config, log=lambda line: None)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_rgb_prompt_masks_no_png_files_and_an_autoscaling_actor_pool(assets, dataset, baseline, tmp_path, ray_session):
    """Three options in one run, each with its own check:
    - `prompts.mask_format: rgb`: palette-coloured prompt masks give exactly the masks of the label-map set;
    - `output.png: false`: no masks/ folder and no mask_uri, but every row still carries its mask;
    - `compute.actors: [1, 2]` over more than one batch: every key once, every mask the model's."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("p0", "p1"):
        (prompts / f"{name}.jpg").write_bytes((assets / "prompts" / f"{name}.jpg").read_bytes())
        labels = np.asarray(Image.open(assets / "prompts" / f"{name}.png"))
        Image.fromarray(PALETTE[labels]).save(prompts / f"{name}.png")  # RGB, the class colours painted by hand
    size = model_of(str(assets / "checkpoint"), "float32").config.input_size
    rgb_tensors = prompt_tensors(prompts, size, "rgb")
    label_tensors = prompt_tensors(assets / "prompts", size)
    assert np.array_equal(rgb_tensors[1], label_tensors[1])  # painting and nearest resizing commute

    output = tmp_path / "out"
    rows = run_job(
        assets,
        str(dataset[0]),
        output,
        prompts={"uri": str(prompts), "mask_format": "rgb"},
        output={"png": False},
        compute={"actors": [1, 2], "batch_size": 2},
    )
    assert sorted(rows) == sorted(dataset[1])  # rows_by_key checked that no key is there twice
    assert not (output / "masks").exists() and (output / "_SUCCESS").exists()
    assert (baseline[0] / "masks").is_dir()  # the default writes them
    for key, data in dataset[1].items():
        assert rows[key]["mask_uri"] is None and baseline[1][key]["mask_uri"] is not None
        check_row(rows[key], model_map(assets, shown(data), prompts=rgb_tensors))
        assert rows[key]["mask"] == baseline[1][key]["mask"]
    job = json.loads((output / "_job.json").read_text())
    assert job["config"]["compute"]["actors"] == [1, 2] and job["config"]["output"]["png"] is False
    assert job["config"]["prompts"]["mask_format"] == "rgb"
    assert (job["counts"]["ok"], job["counts"]["error"], job["counts"]["skipped"]) == (COUNT, 0, 0)


def test_custom_image_column_on_parquet(assets, tmp_path, ray_session):
    """`input.image_column: img` reads that column (bytes or the {bytes, path} struct), rows keyed `<shard>/<row>`;
    a shard without the column is one error row keyed by the shard, and the job goes on."""
    data = tmp_path / "data"
    data.mkdir()
    images = [encoded(picture(400 + i, (26 + 5 * i, 31 - 2 * i))) for i in range(5)]
    decoys = pa.array([encoded(picture(500 + i, (50, 10))) for i in range(3)], pa.binary())  # what `image` would give
    pq.write_table(pa.table({"image": decoys, "img": pa.array(images[:3], pa.binary())}), data / "a.parquet")
    structs = pa.array([{"bytes": image, "path": "same.jpg"} for image in images[3:]])
    pq.write_table(pa.table({"id": [3, 4], "img": structs}), data / "b.parquet")
    pq.write_table(pa.table({"image": pa.array([encoded(picture(9, (20, 20)))], pa.binary())}), data / "c.parquet")
    keys = {
        "a.parquet/0": images[0],
        "a.parquet/1": images[1],
        "a.parquet/2": images[2],
        "b.parquet/0": images[3],
        "b.parquet/1": images[4],
    }

    rows = run_job(assets, str(data), tmp_path / "out", input={"image_column": "img"})

    assert sorted(rows) == sorted([*keys, "c.parquet"])
    for key, image in keys.items():
        check_row(rows[key], model_map(assets, Image.open(io.BytesIO(image))))
        assert rows[key]["source"] == f"file://{data / key.partition('/')[0]}"
    bad = rows["c.parquet"]
    assert bad["status"] == "error" and bad["mask"] is None and "'img'" in bad["error"]
    assert bad["source"] == f"file://{data / 'c.parquet'}"


def test_jpeg_draft_and_fractional_cpu_tasks(assets, tmp_path, ray_session):
    """`input.jpeg_draft` and `compute.cpus_per_task: 0.5` in one run. Each 256x192 JPEG is labelled from PIL's draft
    decoding (1/4 scale, 64x48: the smallest still >= the model's 32x32) and its row keeps the full size.
    (`model.attention: flex` is checked below without a run: on the CPU it compiles for half a minute; its numbers are
    test_attention's.)"""
    folder = tmp_path / "large"
    folder.mkdir()
    images = {f"large{i}.jpg": encoded(picture(400 + i, (256, 192))) for i in range(4)}  # 2 batches of 2
    for key, data in images.items():
        (folder / key).write_bytes(data)
    rows = run_job(assets, str(folder), tmp_path / "out", input={"jpeg_draft": True}, compute={"cpus_per_task": 0.5})
    assert sorted(rows) == sorted(images)
    for key, data in images.items():
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (32, 32))
        image.load()
        assert image.size == (64, 48)
        expected = model_map(assets, image, shape=(192, 256))
        check_row(rows[key], expected)
        assert not np.array_equal(expected, model_map(assets, Image.open(io.BytesIO(data)))), "draft changed nothing"


def test_the_attention_option_reaches_the_inference_actor(assets, ray_session):
    prompts = load_prompt_set(
        str(assets / "prompts"), classes=tuple(CLASSES), mask_format="labels", embedding="semantic", size=(64, 32)
    )
    for option, backend in (("flex", "flex"), ("sdpa", "sdpa"), ("auto", "sdpa")):  # auto on the CPU: sdpa
        predictor = SegGptPredictor(
            str(assets / "checkpoint"), prompts, dtype="float32", attention=option, storage_options={}, retry=Retry(1)
        )
        backends = {module.backend for module in predictor.model.modules() if isinstance(module, Attention)}
        assert backends == {backend}, option
