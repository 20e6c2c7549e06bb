"""The job on data shaped like real data: a bad image among hundreds in every input format, a mistyped input with
`resume: false`, resuming into labels of another model or prompt set, and two runs on one output at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_job import (
    CLASSES,
    REFUSALS_CHILD,
    REPO,
    TINY,
    encoded,
    expected_map,
    job_config,
    make_assets,
    picture,
    read_labels,
)
from test_read import tar_bytes

from jobs.cli import main as cli
from model.processing import decode_png
from pipeline.labelling.job import autolabel

BAD = b"this is a text file, not a JPEG\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


def small_jpeg(i: int) -> bytes:
    return encoded(picture(i, (12 + i % 5, 10 + i % 3)))


def write_shards(
    folder: Path, kind: str, first: int, count: int, per_shard: int, bad_at: int | None
) -> dict[str, bytes]:
    """Images first..first+count as tar or Parquet shards of `per_shard`; the bad file at index `bad_at`."""
    keys = {}
    for start in range(first, first + count, per_shard):
        members = [
            (f"{i:04d}.jpg", BAD if i == bad_at else small_jpeg(i))
            for i in range(start, min(start + per_shard, first + count))
        ]
        if kind == "webdataset":
            shard = f"shard-{start:04d}.tar"
            (folder / shard).write_bytes(tar_bytes(members))
            keys.update({f"{shard}/{name}": data for name, data in members})
        else:
            shard = f"shard-{start:04d}.parquet"
            pq.write_table(
                pa.table({"image": pa.array([data for _, data in members], pa.binary())}),
                folder / shard,
                row_group_size=64,
            )
            keys.update({f"{shard}/{row}": data for row, (_, data) in enumerate(members)})
    return keys


def write_inputs(folder: Path, kind: str, first: int, count: int, bad_at: int) -> dict[str, bytes]:
    folder.mkdir(exist_ok=True)
    if kind != "images":
        return write_shards(folder, kind, first, count, per_shard=100, bad_at=bad_at)
    keys = {}
    for i in range(first, first + count):
        name = f"zz-bad-{i}.jpg" if i == bad_at else f"{i:04d}.jpg"
        keys[name] = BAD if i == bad_at else small_jpeg(i)
        (folder / name).write_bytes(keys[name])
    return keys


@pytest.mark.parametrize("kind", ["images", "webdataset", "parquet"])
def test_one_bad_image_among_hundreds_and_a_resume(kind, assets, tmp_path, ray_session):
    """600 good images and one bad one at the default batch_size (8) and rows_per_file (256); then 50 more files,
    one of them bad: exit 0 both times, every key once, one error row per bad file."""
    data, output = tmp_path / "data", tmp_path / "out"
    keys = write_inputs(data, kind, 0, 601, bad_at=300)
    config = job_config(assets, str(data), str(output), {})
    config["compute"] = {"cpus_per_actor": 0.5}  # batch_size and rows_per_file at their defaults
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))

    assert cli(["run", str(path)]) == 0
    table = read_labels(str(output), {})
    assert sorted(table["key"].to_pylist()) == sorted(keys)
    errors = table.filter(pc.equal(table["status"], "error"))
    assert errors["key"].to_pylist() == [key for key, data in keys.items() if data == BAD]
    # ok rows written to several files (256 rows each) and merged at the end (output.file_mb), the error in its own
    assert len(list((output / "labels").glob("*.parquet"))) == 2

    keys.update(write_inputs(data, kind, 1000, 50, bad_at=1020))
    lines: list[str] = []
    summary = autolabel(str(path), log=lines.append)
    table = read_labels(str(output), {})
    assert table.num_rows == len(keys) == 651 and sorted(table["key"].to_pylist()) == sorted(keys)
    assert sorted(table.filter(pc.equal(table["status"], "error"))["key"].to_pylist()) == sorted(
        key for key, data in keys.items() if data == BAD
    )
    assert summary.skipped == 600 and (summary.ok, summary.error) == (49, 2)  # the old bad file is tried again
    shards_to_read = {"images": 51, "webdataset": 2, "parquet": 2}[kind]  # finished shards are not opened
    assert lines[0].endswith(f", {shards_to_read} files or shards to read"), lines[0]
    rows = {row["key"]: row for row in table.to_pylist()}
    for key in list(keys)[::97]:
        if keys[key] != BAD:
            assert np.array_equal(decode_png(rows[key]["mask"]), expected_map(assets, keys[key]))


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_mistyped_input_with_resume_false_leaves_the_output_and_starts_no_ray(assets, tmp_path, ray_session):
    data, output = tmp_path / "data", tmp_path / "out"
    write_inputs(data, "images", 0, 5, bad_at=-1)
    config = job_config(assets, str(data), str(output), {})
    assert autolabel(config, log=lambda line: None).ok == 5
    before = tree_digest(output)
    assert {"_SUCCESS", "_job.json"} <= set(before) and any(name.startswith("masks/") for name in before)

    typo = {**config, "input": {"uri": str(tmp_path / "dtaa")}, "output": {"uri": str(output), "resume": False}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(typo))
    # the CLI in a fresh process, which says whether Ray was ever started in it
    child = subprocess.run(
        [sys.executable, "-c", REFUSALS_CHILD, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"},
    )
    [result] = json.loads(child.stdout.splitlines()[-1])
    assert result["code"] == 2 and "input.uri" in result["stderr"] and "does not exist" in result["stderr"]
    assert result["stderr"].count("\n") == 1  # one line
    assert not result["ray"]  # no Ray started
    assert tree_digest(output) == before  # byte for byte


def other_checkpoint(assets: Path, root: Path) -> Path:
    """The same architecture with other weights."""
    folder = root / "checkpoint-b"
    folder.mkdir()
    weights = load_file(assets / "checkpoint" / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    save_file(
        {name: value + 0.3 * torch.randn(value.shape, generator=generator) for name, value in weights.items()},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text((assets / "checkpoint" / "config.json").read_text())
    return folder


def test_resume_refuses_labels_of_another_model_or_prompt_set_and_relabels_on_request(
    assets, tmp_path, ray_session, capsys
):
    data, output = tmp_path / "data", tmp_path / "out"
    keys = write_inputs(data, "images", 0, 15, bad_at=-1)  # 0000.jpg ... 0014.jpg
    model_a = job_config(assets, str(data / "000*.jpg"), str(output), {})  # 0000..0009
    assert autolabel(model_a, log=lambda line: None).ok == 10
    before = tree_digest(output)

    checkpoint_b = other_checkpoint(assets, tmp_path)
    model_b = {**model_a, "model": {"checkpoint": str(checkpoint_b)}}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({**model_b, "input": {"uri": str(data)}}))
    capsys.readouterr()
    assert cli(["run", str(path)]) == 2 and tree_digest(output) == before  # refused; the output untouched
    fingerprint_a = json.loads((output / "_job.json").read_text())["model_fingerprint"]
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and f"10 labels there were made by model {fingerprint_a} with prompt set" in message
    assert "this run has model " in message and "output.on_mismatch=relabel" in message

    prompts_b = tmp_path / "prompts-b"
    prompts_b.mkdir()
    for file in (assets / "prompts").iterdir():  # one prompt fewer: another prompt set
        if file.stem == "p0":
            (prompts_b / file.name).write_bytes(file.read_bytes())
    path_p = tmp_path / "p.yaml"
    path_p.write_text(yaml.safe_dump({**model_a, "prompts": {"uri": str(prompts_b), "classes": CLASSES}}))
    assert cli(["run", str(path_p)]) == 2 and tree_digest(output) == before
    prompt_set_a = json.loads((output / "_job.json").read_text())["prompt_set_fingerprint"]
    message = capsys.readouterr().err
    assert f"with prompt set {prompt_set_a}, this run has model {fingerprint_a} with prompt set " in message

    # With relabel: a run over 0010..0014 only labels those (the old rows are outside its input and stay) ...
    relabel = ["output.on_mismatch=relabel"]
    partial = autolabel({**model_b, "input": {"uri": str(data / "001*.jpg")}}, tuple(relabel), log=lambda line: None)
    assert (partial.ok, partial.skipped) == (5, 0)
    rows_b = {row["key"]: row for row in read_labels(str(output), {}).to_pylist() if row["key"] >= "0010"}
    # ... and a run over everything relabels exactly the ten rows of model A.
    summary = autolabel({**model_b, "input": {"uri": str(data)}}, tuple(relabel), log=lambda line: None)
    assert (summary.ok, summary.skipped, summary.added) == (10, 5, 0)
    table = read_labels(str(output), {})
    assert sorted(table["key"].to_pylist()) == sorted(keys)
    job = json.loads((output / "_job.json").read_text())
    assert set(table["model"].to_pylist()) == {job["model_fingerprint"]} != {fingerprint_a}
    assert [run["counts"]["ok"] for run in job["runs"]] == [10, 5, 10]  # the history of the runs
    assert [run["model_fingerprint"] == fingerprint_a for run in job["runs"]] == [True, False, False]
    assets_b = tmp_path / "assets-b"
    assets_b.mkdir()
    (assets_b / "checkpoint").symlink_to(checkpoint_b)
    (assets_b / "prompts").symlink_to(assets / "prompts")
    for row in table.to_pylist():
        if row["key"] >= "0010":
            assert row == rows_b[row["key"]]  # rows of model B were not touched
        assert np.array_equal(decode_png(row["mask"]), expected_map(assets_b, keys[row["key"]]))


def test_two_runs_on_one_output_at_once(assets, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    keys = write_inputs(data, "images", 0, 40, bad_at=-1)
    config = job_config(assets, str(data), str(output), {})
    config["compute"]["batch_size"] = 1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "jobs.cli", "run", str(path)]
    runs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]

    assert sorted(code for code, _, _ in results) == [0, 2], results
    refused = next(stderr for code, _, stderr in results if code == 2)
    winner = next(run for run, (code, _, _) in zip(runs, results) if code == 0)
    assert "in use by another run" in refused and f"pid {winner.pid}," in refused and "started 20" in refused
    table = read_labels(str(output), {})
    assert sorted(table["key"].to_pylist()) == sorted(keys)  # every key once
    assert not (output / "_lease.json").exists()  # released at the end
