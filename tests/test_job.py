"""The auto-labelling job end to end: local Ray, a real S3 server on loopback, every input format, bad files,
resume after a killed driver, refusals before any Ray work, and the demo."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as coco_mask
from safetensors.torch import save_file

from jobs.cli import main as cli
from model import SegGpt, SegGptConfig, load_model
from model.memory import KEEP_FREED_MEMORY_ENV
from model.processing import decode_png, masks_to_class_ids, normalize, prepare_image, upsample_class_map
from pipeline.labelling.job import autolabel
from pipeline.prompts.sets import load_prompt_set, tuned_prompt_bytes
from pipeline.results.export import export
from pipeline.results.review import review

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=[64, 32],
    patch_size=8,
    pretrain_image_size=32,
    decoder_hidden_size=8,
    merge_index=1,
    intermediate_hidden_state_indices=[1, 2],
)
CLASSES = ["disc", "square"]
SIZES = [(40, 30), (17, 53), (64, 64), (90, 20), (33, 33), (25, 70)]


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def make_assets(root: Path, config: dict) -> Path:
    """A random checkpoint of `config` and a two-prompt set, on local disk."""
    (root / "checkpoint").mkdir()
    torch.manual_seed(0)
    model = SegGpt(SegGptConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_file(model.state_dict(), root / "checkpoint" / "model.safetensors")
    (root / "checkpoint" / "config.json").write_text(json.dumps(config))
    (root / "prompts").mkdir()
    for i in range(2):
        picture(100 + i, (48, 40)).save(root / "prompts" / f"p{i}.jpg")
        labels = np.zeros((40, 48), np.uint8)
        labels[5:20, 5:25], labels[22:35, 20:45] = 1, 2
        Image.fromarray(labels).save(root / "prompts" / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


def expected_map(assets: Path, data: bytes) -> np.ndarray:
    """The model package's own class map for one encoded image, at the image's size."""
    model = load_model(str(assets / "checkpoint"))
    prompts = load_prompt_set(
        str(assets / "prompts"),
        classes=tuple(CLASSES),
        mask_format="labels",
        embedding="semantic",
        size=model.config.input_size,
    )
    image = Image.open(io.BytesIO(data))
    k = len(prompts.names)
    pixels = normalize(torch.from_numpy(prepare_image(image, model.config.input_size))[None]).repeat(k, 1, 1, 1)
    pred = model.predict(
        pixels,
        normalize(torch.from_numpy(prompts.images)),
        normalize(torch.from_numpy(prompts.masks)),
        num_prompts=k,
        embedding_type="semantic",
    )
    ids, _ = masks_to_class_ids(pred, torch.from_numpy(prompts.palette))
    return upsample_class_map(ids[0].numpy(), (image.height, image.width))


def job_config(assets: Path, input_uri: str, output_uri: str, storage_options: dict, **input_options) -> dict:
    return {
        "input": {"uri": input_uri, **input_options},
        "prompts": {"uri": str(assets / "prompts"), "classes": CLASSES},
        "model": {"checkpoint": str(assets / "checkpoint")},
        "output": {"uri": output_uri},
        "compute": {"batch_size": 2, "cpus_per_actor": 0.5},
        "storage_options": storage_options,
    }


def read_labels(output_uri: str, storage_options: dict) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    fs.invalidate_cache()
    files = sorted(fs.glob(f"{root}/labels/*.parquet"))
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f))) for f in files])


def put_dataset(fs, root: str, kind: str) -> dict[str, bytes]:
    """Write the same images as `kind` under `root`; returns {key: encoded image}."""
    images = {f"img{i}.jpg": encoded(picture(i, size)) for i, size in enumerate(SIZES)}
    if kind == "images":
        keys = {}
        for i, (name, data) in enumerate(images.items()):
            key = f"part{i % 2}/{name}"
            fs.pipe_file(f"{root}/{key}", data)
            keys[key] = data
        return keys
    if kind == "webdataset":
        keys = {}
        for shard in range(2):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for name, data in list(images.items())[shard::2]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    keys[f"shard{shard}.tar/{name}"] = data
            fs.pipe_file(f"{root}/shard{shard}.tar", buffer.getvalue())
        return keys
    keys = {}
    for shard, struct in ((0, False), (1, True)):
        values = list(images.values())[shard::2]
        column = pa.array([{"bytes": v, "path": "x.jpg"} for v in values]) if struct else pa.array(values, pa.binary())
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": column, "id": list(range(len(values)))}), buffer)
        fs.pipe_file(f"{root}/shard{shard}.parquet", buffer.getvalue())
        keys.update({f"shard{shard}.parquet/{row}": v for row, v in enumerate(values)})
    return keys


@pytest.mark.parametrize("kind", ["images", "webdataset", "parquet"])
def test_end_to_end_on_s3(kind, assets, s3_bucket, ray_session):
    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)
    keys = put_dataset(fs, f"{bucket.removeprefix('s3://')}/data", kind)
    fs.put(str(assets / "checkpoint"), f"{bucket}/model", recursive=True)
    config = job_config(assets, f"{bucket}/data", f"{bucket}/out", storage_options)
    config["model"]["checkpoint"] = f"{bucket}/model"

    lines: list[str] = []
    summary = autolabel(config, log=lines.append, progress_every_s=0)

    assert (summary.ok, summary.error) == (len(keys), 0)
    assert (
        lines[0] == f"planned: {len(keys) if kind == 'images' else 2} input files, 0 images done before, "
        f"{len(keys) if kind == 'images' else 2} files or shards to read"
    )
    assert lines[1] == (
        "compute: no GPU (CPU model actors), float32, sdpa attention: the cluster has no GPUs, its "
        "autoscaler reports no GPU node types, and none joined within compute.gpu_wait_s (0 s)"
    )
    assert lines[2:] and all(line.startswith("progress: labelled") for line in lines[2:])  # plain lines off a terminal
    table = read_labels(f"{bucket}/out", storage_options)
    assert sorted(table["key"].to_pylist()) == sorted(keys)
    for row in table.to_pylist():
        data = keys[row["key"]]
        image = Image.open(io.BytesIO(data))
        assert row["status"] == "ok" and (row["width"], row["height"]) == image.size
        class_map = decode_png(row["mask"])
        assert np.array_equal(class_map, decode_png(fs.cat_file(row["mask_uri"])))
        assert np.array_equal(class_map, expected_map(assets, data))
        counts = np.bincount(class_map.ravel(), minlength=3)
        assert row["class_ids"] == np.flatnonzero(counts).tolist()
        assert row["pixel_counts"] == counts[counts > 0].tolist()
        assert 0 <= row["score"] <= 1
        assert len(row["class_scores"]) == len(row["class_ids"]) and all(0 <= v <= 1 for v in row["class_scores"])
    if kind == "webdataset":  # export from an S3 output whose inputs were shards: every RLE back to the class maps
        assert export(f"{bucket}/out", "coco", storage_options=storage_options).images == len(keys)
        coco = json.loads(fs.cat_file(f"{bucket}/out/export/coco/instances.json"))
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        maps = {row["key"]: decode_png(row["mask"]) for row in table.to_pylist()}
        unions = {key: np.zeros_like(class_map) for key, class_map in maps.items()}
        for annotation in coco["annotations"]:
            rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
            unions[names[annotation["image_id"]]][coco_mask.decode(rle) > 0] = annotation["category_id"]
        assert all(np.array_equal(unions[key], maps[key]) for key in maps)
        pictured = review(f"{bucket}/out", storage_options=storage_options)  # images read back from the shards
        assert len(pictured.overlays) == len(keys) and pictured.unreadable == []
        page = fs.cat_file(f"{bucket}/out/review/index.html").decode()
        assert all(key in page for key in keys)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/_SUCCESS")
    job = json.loads(fs.cat_file(f"{bucket}/out/_job.json"))
    assert job["counts"] == {"ok": len(keys), "error": 0, "skipped": 0, "added": len(keys)}
    assert [run["counts"] for run in job["runs"]] == [job["counts"]]
    assert job["classes"] == ["background", *CLASSES]
    assert job["config"]["storage_options"]["secret"] == "***"


def test_bad_files_become_error_rows(assets, tmp_path, ray_session, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = {
        "good.jpg": encoded(picture(1, (30, 20))),
        "cmyk.jpg": encoded(picture(2, (21, 13)).convert("CMYK")),
        "grey16.png": encoded(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100), "PNG"),
        "la.png": encoded(picture(3, (16, 16)).convert("LA"), "PNG"),
        "palette.png": encoded(picture(4, (19, 23)).convert("P"), "PNG"),
    }
    bad = {
        "corrupt.jpg": b"\xff\xd8\xff" + os.urandom(300),
        "truncated.jpg": encoded(picture(5, (64, 64)))[:400],
        "empty.png": b"",
        "text.png": b"this is not an image\n",
    }
    for name, payload in {**good, **bad}.items():
        (data / name).write_bytes(payload)
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(job_config(assets, str(data), str(tmp_path / "out"), {})))

    actors = ProcessEnvironments("ray::MapWorker(MapBatches(SegGptPredictor))")
    actors.start()
    assert cli(["run", str(config_path)]) == 0
    actors.stop.set()
    actors.join()
    # The inference actor's process starts with the allocator settings that keep freed tensors (test_memory.py).
    assert actors.found
    assert all(KEEP_FREED_MEMORY_ENV.items() <= environ.items() for environ in actors.found.values())

    rows = {row["key"]: row for row in read_labels(str(tmp_path / "out"), {}).to_pylist()}
    assert sorted(rows) == sorted({**good, **bad})
    for name in bad:
        assert rows[name]["status"] == "error" and rows[name]["mask"] is None
        assert rows[name]["error"]
    assert "empty" in rows["empty.png"]["error"] and "not an image" in rows["text.png"]["error"]
    for name, payload in good.items():
        assert rows[name]["status"] == "ok", rows[name]["error"]
        assert np.array_equal(decode_png(rows[name]["mask"]), expected_map(assets, payload))
    assert "4 error" in capsys.readouterr().out


def own_processes(title: str) -> list[int]:
    """Processes descended from this one (its Ray's workers) whose title starts with `title`: a Ray worker names
    itself after the task or actor it runs. Other Ray instances on the machine are none of our business."""
    parents, titled = {}, []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int(Path(entry.path, "stat").read_text().rpartition(")")[2].split()[1])
                if Path(entry.path, "cmdline").read_bytes().startswith(title.encode()):
                    titled.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile

    def descends(pid: int) -> bool:
        while pid in parents and pid != os.getpid():
            pid = parents[pid]
        return pid == os.getpid()

    return [pid for pid in titled if descends(pid)]


class ProcessEnvironments(threading.Thread):
    """While running: the environments of our processes whose title starts with `title` (`own_processes`), read
    from /proc every 20 ms."""

    def __init__(self, title: str) -> None:
        super().__init__(daemon=True)
        self.title, self.found, self.stop = title, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for pid in own_processes(self.title):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    self.found[pid] = dict(v.decode().split("=", 1) for v in environ if b"=" in v)
                except OSError:
                    continue  # ended meanwhile


def long_job(tmp_path: Path, count: int = 130, image_size: tuple[int, int] = (256, 128)) -> dict:
    """A job that can be interrupted part-way: loose files are read 64 to a block and a block flows through the
    stages whole, so three blocks, small labels files, and a model slow enough that the first file is written well
    before the last image is labelled (a larger `image_size`: slower)."""
    assets = make_assets(tmp_path, {**TINY, "image_size": list(image_size), "patch_size": 16})
    data = tmp_path / "data"
    data.mkdir()
    for i in range(count):
        (data / f"{i:03d}.jpg").write_bytes(encoded(picture(i, (20 + i % 7, 16))))
    config = job_config(assets, str(data), str(tmp_path / "out"), {})
    config["compute"].update(batch_size=1, cpus_per_actor=0.5)
    config["output"]["rows_per_file"] = 2
    return config


def test_resume_after_killed_driver(tmp_path, ray_session):
    count = 70  # two blocks: the driver dies while the model works through the first
    config = long_job(tmp_path, count)
    output = tmp_path / "out"
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "jobs.cli", "run", str(config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}

    driver = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list((output / "labels").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    files: set = set()
    while files != (files := set((output / "labels").glob("*.parquet"))):  # Ray's workers die shortly after
        time.sleep(2)
    partial = read_labels(str(output), {}).num_rows
    assert 0 < partial < count and not (output / "_SUCCESS").exists()

    lines: list[str] = []  # the next run, from this process (the test session's Ray)
    finished = autolabel(str(config_path), log=lines.append)
    keys = read_labels(str(output), {})["key"].to_pylist()
    assert sorted(keys) == sorted(f"{i:03d}.jpg" for i in range(count))  # every key exactly once
    assert (output / "_SUCCESS").exists()
    assert (finished.skipped, finished.ok) == (partial, count - partial) and f"{partial} images done before" in lines[0]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with its own Ray (not the test session's), and `env` added to the environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_daily_rerun_labels_exactly_the_new_images_and_touches_nothing_else(assets, tmp_path, ray_session):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"day1-{i:02d}.jpg").write_bytes(encoded(picture(i, (24 + i, 18))))
    config = job_config(assets, str(data), str(tmp_path / "out"), {})
    config["output"]["rows_per_file"] = 4
    first = autolabel(config, log=lambda line: None)
    assert (first.ok, first.added) == (12, 12)
    out = tmp_path / "out"
    written = {
        path: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in [*out.glob("labels/*.parquet"), *out.glob("masks/**/*.png")]
    }
    # the 3 labels files as written merged into one at the end (output.file_mb), and a mask per image
    assert (
        sum(path.suffix == ".parquet" for path in written) == 1 and sum(path.suffix == ".png" for path in written) == 12
    )

    new = {f"day2-{i:02d}.jpg": encoded(picture(100 + i, (30, 20 + i))) for i in range(10)}
    for name, payload in new.items():
        (data / name).write_bytes(payload)
    second = autolabel(config, log=lambda line: None)

    assert (second.ok, second.error, second.skipped, second.added) == (10, 0, 12, 10)
    for path, (payload, mtime) in written.items():  # every earlier labels file and mask as it was, byte for byte
        assert path.read_bytes() == payload and path.stat().st_mtime_ns == mtime, path
    rows = {row["key"]: row for row in read_labels(str(tmp_path / "out"), {}).to_pylist()}
    assert len(rows) == 22 and all(row["status"] == "ok" for row in rows.values())
    for name, payload in new.items():
        assert np.array_equal(decode_png(rows[name]["mask"]), expected_map(assets, payload))
    runs = json.loads((tmp_path / "out" / "_job.json").read_text())["runs"]
    assert [run["counts"] for run in runs] == [
        {"ok": 12, "error": 0, "skipped": 0, "added": 12},
        {"ok": 10, "error": 0, "skipped": 12, "added": 10},
    ]


REFUSALS_CHILD = """
import contextlib, io, json, sys
import ray
from jobs.cli import main
results = []
for path in sys.argv[1:]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", path])
    results.append({"code": code, "stderr": stderr.getvalue(), "ray": ray.is_initialized()})
print(json.dumps(results))
"""


def test_refusals_name_the_problem_before_any_ray_work(assets, tmp_path):
    good = job_config(assets, str(tmp_path), str(tmp_path / "out"), {})
    cases = {
        "compute.batch_sise": ({**good, "compute": {"batch_sise": 2}}, "compute.batch_sise"),
        "wrong type": ({**good, "compute": {"batch_size": "many"}}, "compute.batch_size"),
    }
    bad_prompts = tmp_path / "prompts"
    bad_prompts.mkdir()
    picture(0, (48, 40)).save(bad_prompts / "p.jpg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad_prompts / "p.png")
    cases["mask size"] = ({**good, "prompts": {"uri": str(bad_prompts), "classes": CLASSES}}, "p.png")
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "model.safetensors").write_bytes((assets / "checkpoint" / "model.safetensors").read_bytes())
    (mismatched / "config.json").write_text(json.dumps({**TINY, "hidden_size": 64}))
    cases["checkpoint"] = ({**good, "model": {"checkpoint": str(mismatched)}}, "mis-shaped")
    size = SegGptConfig(**TINY).input_size
    for name, shape, classes in (
        ("small.safetensors", (3, size[0] // 2, size[1]), CLASSES),
        ("other-classes.safetensors", (3, *size), ["disc", "star"]),
    ):
        (tmp_path / name).write_bytes(
            tuned_prompt_bytes(torch.zeros(shape), torch.zeros(shape), classes=classes, embedding="semantic")
        )
        cases[name] = ({**good, "prompts": {"uri": str(tmp_path / name), "classes": CLASSES}}, name)
    paths = []
    for name, (config, _) in cases.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
    # one fresh process runs the CLI on every case, and says whether Ray was ever started in it
    child = subprocess.run(
        [sys.executable, "-c", REFUSALS_CHILD, *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"},
    )
    results = json.loads(child.stdout.splitlines()[-1])
    for (name, (_, expected)), result in zip(cases.items(), results):
        assert result["code"] == 2, (name, result)
        assert expected in result["stderr"] and result["stderr"].startswith("seggpt-autolabel: error: "), (name, result)
        assert not result["ray"], name  # refused before Ray started
    assert len(results) == len(cases) and not (tmp_path / "out").exists()


def test_dry_run_counts_inputs(assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.jpg").write_bytes(encoded(picture(i, (20, 20))))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_config(assets, str(data), str(tmp_path / "out"), {})))
    result = run_cli("run", str(path), "--dry-run", "--set", "compute.batch_size=4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"]["images"] == 3 and report["prompts"] == ["p0", "p1"]
    assert not (tmp_path / "out").exists()


def test_demo_command_of_the_readme(tmp_path):
    """`seggpt-autolabel demo`, run as the README says, from a folder that is not the checkout."""
    result = subprocess.run(
        ["seggpt-autolabel", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "local"},
    )
    assert result.returncode == 0, result.stderr
    output = tmp_path / "seggpt-demo-output"
    table = read_labels(str(output), {})
    assert table.num_rows == 12 and set(table["status"].to_pylist()) == {"ok"}
    assert (output / "_SUCCESS").exists() and len(list((output / "masks").glob("*.png"))) == 12
    assert "12 ok" in result.stdout and "masks/" in result.stdout
    overlays = sorted((output / "review" / "overlays").glob("*.jpg"))  # the review page the README points to
    assert (
        len(overlays) == 12 and Image.open(overlays[0]).size == Image.open(REPO / "jobs/demo/images/sample00.jpg").size
    )
    page = (output / "review" / "index.html").read_text()
    assert all(f'src="overlays/{path.name}"' in page for path in overlays) and "review/index.html" in result.stdout
    mean_iou = float(result.stdout.split("demo: mean IoU ")[1].split()[0])  # against the sample's ground truth
    assert (
        mean_iou >= 0.5 and "images compared 12, missing 0, unusable truth 0" in result.stdout
    )  # the trained model: 0.55
