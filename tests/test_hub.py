"""Hugging Face model ids as checkpoints (`model.checkpoint: org/name[@revision]`, as in transformers), resolved
offline (HF_HUB_OFFLINE=1) from a hub cache laid out the way huggingface_hub lays it out: blobs named by their
hash, a snapshot folder per commit whose files link to them, `refs/main` naming the commit."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml

from jobs.cli import main as cli
from model import CheckpointError, load_model
from model.processing import decode_png
from pipeline.labelling import load_config
from pipeline.prompts.select import checkpoint_uri
from pipeline.training.config import load_train_config
from tests.test_job import TINY, encoded, expected_map, job_config, make_assets, picture, read_labels, run_cli

REPO_ID = "test-org/tiny-seggpt"


def hub_cache(root: Path, repo: str, checkpoint: Path) -> str:
    """`root` as an HF_HUB_CACHE holding `checkpoint`'s files as `repo` at its main branch; returns the commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for path in (folder / "blobs", folder / "refs", snapshot):
        path.mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for file in sorted(checkpoint.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, folder / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return commit


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


@pytest.fixture
def offline_cache(assets, tmp_path, monkeypatch) -> tuple[Path, str]:
    """A prepared hub cache, and this process offline with it (the constants huggingface_hub read from HF_* at
    import, set as those variables would set them)."""
    cache = tmp_path / "hub"
    commit = hub_cache(cache, REPO_ID, assets / "checkpoint")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, commit


def test_a_hub_id_loads_the_cached_snapshot_at_main_or_at_a_revision(assets, offline_cache):
    _, commit = offline_cache
    local = load_model(str(assets / "checkpoint")).state_dict()
    for uri in (REPO_ID, f"{REPO_ID}@{commit}"):
        loaded = load_model(uri).state_dict()
        assert loaded.keys() == local.keys() and all(torch.equal(loaded[k], local[k]) for k in local), uri
    with pytest.raises(CheckpointError, match=r"^test-org/not-cached: a Hugging Face model id, not in the hub cache"):
        load_model("test-org/not-cached")


def test_configs_keep_a_hub_id_and_make_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)  # a relative path that exists is a path, not an id
    job = {"input": {"uri": "in"}, "output": {"uri": "out"}, "prompts": {"uri": "p", "classes": ["a"]}}
    for checkpoint, expected in ((REPO_ID, REPO_ID), ("models/mine", str(tmp_path / "models" / "mine"))):
        assert load_config({**job, "model": {"checkpoint": checkpoint}}).model.checkpoint == expected
        train = {"data": {"uri": "d"}, "output": {"uri": "o"}, "model": {"checkpoint": checkpoint}}
        assert load_train_config(train).model.checkpoint == expected
        assert checkpoint_uri(checkpoint) == expected  # select-prompts' and tune's --checkpoint
    assert load_config({**job, "model": {"checkpoint": "s3://b/m"}}).model.checkpoint == "s3://b/m"


def test_the_job_labels_with_a_hub_id_offline_as_the_model_package_does(assets, tmp_path):
    """The CLI in a fresh process with HF_HUB_CACHE and HF_HUB_OFFLINE=1, as an operator sets them: its model
    actors resolve the id themselves, in the node's cache, and label as the model package does."""
    cache = tmp_path / "hub"
    hub_cache(cache, REPO_ID, assets / "checkpoint")
    data = tmp_path / "data"
    data.mkdir()
    images = {f"{i}.jpg": encoded(picture(i, (24, 18))) for i in range(3)}
    for name, payload in images.items():
        (data / name).write_bytes(payload)
    config = job_config(assets, str(data), str(tmp_path / "by-id"), {})
    config["model"]["checkpoint"] = REPO_ID
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))

    result = run_cli("run", str(tmp_path / "job.yaml"), env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})

    assert result.returncode == 0, result.stderr
    rows = read_labels(str(tmp_path / "by-id"), {}).to_pylist()
    assert sorted(row["key"] for row in rows) == sorted(images)
    for row in rows:
        assert np.array_equal(decode_png(row["mask"]), expected_map(assets, images[row["key"]]))


def test_an_id_neither_cached_nor_reachable_is_refused_in_one_line(assets, tmp_path, offline_cache, capsys):
    config = job_config(assets, str(tmp_path), str(tmp_path / "out"), {})
    config["model"]["checkpoint"] = "test-org/not-cached"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert cli(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err  # one line, naming the id
    assert err.startswith("seggpt-autolabel: error: test-org/not-cached: a Hugging Face model id, not in the hub")
    assert not (tmp_path / "out").exists()
