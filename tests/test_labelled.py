"""Labelled pairs from loose files, WebDataset and Parquet; bad data refused before any Ray work, a bad sample
mid-run skipped and counted; training on labelled data."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_read import tar_bytes
from test_train import TINY

from pipeline.storage.listing import InputError
from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_labelled
from pipeline.training.checkpoints import read_log
from pipeline.training.synthetic import random_task, render
from pipeline.training.train import train

SIZE = (32, 32)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def samples(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    task = random_task(rng, num_classes=2)
    return [render(task, rng, (40, 48)) for _ in range(count)]


def resized(labels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(labels).resize(SIZE[::-1], Image.Resampling.NEAREST))


def rows(source: LabelledSource, num_classes: int = 2) -> dict[str, dict]:
    items = labelled_pairs(source, {}, num_classes)
    return {row["key"]: row for row in read_labelled(items, source, {}, SIZE, num_classes).take_all()}


def test_three_formats_and_a_bad_sample_among_good_ones(tmp_path, ray_session):
    data = samples(5)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, (image, labels) in enumerate(data[:3]):
        (loose / f"s{i}.jpg").write_bytes(encoded(image, "JPEG"))
        (loose / f"s{i}.png").write_bytes(encoded(labels, "PNG"))
    (loose / "p.png").write_bytes(encoded(data[3][0], "PNG"))  # a PNG image: its mask is p.mask.png
    (loose / "p.mask.png").write_bytes(encoded(data[3][1], "PNG"))
    (loose / "s2.png").write_bytes(encoded(data[2][1][:20], "PNG"))  # s2's mask: half its image's height
    got = rows(LabelledSource(str(loose)))
    assert sorted(got) == ["p.png", "s0.jpg", "s1.jpg", "s2.jpg"]
    assert got["s2.jpg"]["error"] == "mask is 48x20, its image 48x40"  # skipped by the consumer, not a crash
    for key, (_, labels) in zip(["s0.jpg", "s1.jpg", "p.png"], [data[0], data[1], data[3]]):
        assert got[key]["error"] == "" and np.array_equal(got[key]["labels"], resized(labels))
        assert got[key]["image"].shape == (*SIZE, 3)

    shards = tmp_path / "shards"
    shards.mkdir()
    members = []
    for i, (image, labels) in enumerate(data):
        members += [
            (f"{i:04d}.jpg", encoded(image, "JPEG")),
            (f"{i:04d}.cls", b"1"),
            (f"{i:04d}.seg.png", encoded(labels, "PNG")),
        ]
    members[3] = ("0001.jpg", b"not a jpeg")
    (shards / "a.tar").write_bytes(tar_bytes(members))
    got = rows(LabelledSource(str(shards)))
    assert sorted(got) == [f"a.tar/{i:04d}.jpg" for i in range(5)]
    assert got["a.tar/0001.jpg"]["error"].startswith("cannot decode")
    assert np.array_equal(got["a.tar/0004.jpg"]["labels"], resized(data[4][1]))

    table = pa.table(
        {
            "img": [encoded(image, "PNG") for image, _ in data],
            "seg": [{"bytes": encoded(labels, "PNG"), "path": None} for _, labels in data],
        }
    )
    pq.write_table(table, tmp_path / "pairs.parquet")
    got = rows(LabelledSource(str(tmp_path / "pairs.parquet"), image_column="img", mask_column="seg"))
    assert sorted(got) == [f"pairs.parquet/{i}" for i in range(5)]
    assert all(np.array_equal(got[f"pairs.parquet/{i}"]["labels"], resized(data[i][1])) for i in range(5))


def test_bad_labelled_data_is_refused_before_any_ray_work(tmp_path):
    image, labels = samples(1)[0]
    cases = {
        "no pairs": ([("a.jpg", encoded(image, "JPEG"))], "'a' needs one image and one PNG mask"),
        "mask size": (
            [("a.jpg", encoded(image, "JPEG")), ("a.png", encoded(labels[:10], "PNG"))],
            "a.jpg: mask is 48x10, its image 48x40",
        ),
        "label outside": (
            [("a.jpg", encoded(image, "JPEG")), ("a.png", encoded(labels * 100, "PNG"))],
            "a.jpg: label 200 is outside the classes 0..2",
        ),
        "empty folder": ([("notes.txt", b"")], "no image, .tar or .parquet files"),
    }
    for name, (files, message) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        for file, payload in files:
            (folder / file).write_bytes(payload)
        with pytest.raises(InputError, match=message):
            labelled_pairs(LabelledSource(str(folder)), {}, num_classes=2)
        with pytest.raises(InputError, match=message):  # the training command refuses it before starting Ray
            train(
                {
                    "model": {"config": TINY},
                    "data": {"uri": str(folder), "num_classes": 2},
                    "output": {"uri": str(tmp_path / "out")},
                }
            )


def test_training_on_labelled_data_skips_and_counts_bad_samples(tmp_path, ray_session):
    """The worker takes every free CPU of the cluster, as a user gives a node's CPUs to one worker: the reading of
    the data must still go on (it used to wait forever for a CPU)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (image, labels) in enumerate(samples(9)):
        (folder / f"{i}.jpg").write_bytes(encoded(image, "JPEG") if i != 4 else b"broken")
        (folder / f"{i}.png").write_bytes(encoded(labels, "PNG"))
    every_cpu = ray_session.available_resources()["CPU"]
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(
            summary=train(
                {
                    "model": {"config": TINY},
                    "data": {"uri": str(folder), "num_classes": 2},
                    "train": {"steps": 3, "batch_size": 2, "log_every": 1, "warmup_steps": 1},
                    "output": {"uri": str(tmp_path / "out")},
                    "compute": {"cpus_per_worker": every_cpu},
                },
                log=lambda line: None,
            )
        ),
        daemon=True,
    )
    run.start()
    run.join(timeout=240)
    assert not run.is_alive(), (
        f"training hangs (its worker took {every_cpu} CPUs); now free: {ray_session.available_resources()}"
    )
    summary = result["summary"]
    log = read_log(str(tmp_path / "out"), {})
    assert [record["step"] for record in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["skipped"] >= 1  # the broken image, once per pass over the data
    assert summary.checkpoint.endswith("checkpoint-0000003")
