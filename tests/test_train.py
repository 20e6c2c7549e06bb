"""Training on Ray Train: two workers whose gradients meet in one model, checkpoints `load_model` reads, a resume that
continues the loss, refusals before any Ray work, and the synthetic task generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.cli import main as cli
from model import SegGpt, SegGptConfig, load_model
from pipeline.config import ConfigError
from pipeline.training.checkpoints import read_log
from pipeline.training.synthetic import random_task, render, task_pair
from pipeline.training.train import synthetic_batch, train

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=[64, 32],
    patch_size=8,
    pretrain_image_size=32,
    decoder_hidden_size=8,
    merge_index=0,
    intermediate_hidden_state_indices=[0, 1],
    drop_path_rate=0.0,
)


def config(output: Path, **train) -> dict:
    return {
        "model": {"config": TINY},
        "train": {"steps": 6, "batch_size": 2, "log_every": 1, "checkpoint_every": 3, "warmup_steps": 2, **train},
        "output": {"uri": str(output)},
        "compute": {"workers": 1, "cpus_per_worker": 0.5},
    }


def test_two_workers_checkpoints_load_and_a_resume_continues_the_loss(tmp_path, ray_session):
    lr = 1e-3  # constant at step 1 (no warm-up), where the hand-made step below checks it

    def two_workers(output: Path) -> dict:
        return {
            **config(output, warmup_steps=0, lr=lr, weight_decay=0.0, checkpoint_every=1),
            "compute": {"workers": 2, "cpus_per_worker": 0.5},
        }

    whole = tmp_path / "whole"
    summary = train(two_workers(whole), log=lambda line: None)
    assert (summary.first_step, summary.steps) == (0, 6) and summary.checkpoint.endswith("checkpoint-0000006")
    losses = {record["step"]: record["loss"] for record in read_log(str(whole), {})}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    model = load_model(str(whole / "checkpoint-0000006"))
    assert isinstance(model, SegGpt) and model.config.hidden_size == 32
    assert not torch.equal(model.mask_token, load_model(str(whole / "checkpoint-0000003")).mask_token)  # it trained

    # The first step's gradients of both workers met in one model.
    first = load_model(str(whole / "checkpoint-0000001")).state_dict()

    def one_step(ranks: list[int]) -> dict[str, torch.Tensor]:
        """The same step by hand: the mean of the given ranks' gradients, clipped, one AdamW step."""
        torch.manual_seed(0)
        model = SegGpt(SegGptConfig(**TINY)).train()
        grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for rank in ranks:
            model.zero_grad()
            model(**synthetic_batch(0, 0, rank, 2, model.config.input_size), embedding_type="semantic").loss.backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[name] += p.grad / len(ranks)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()
        return model.state_dict()

    both, rank0_only = one_step([0, 1]), one_step([0])
    worst = max((first[name] - both[name]).abs().max().item() for name in both)
    assert worst < 0.1 * lr, worst  # the update of the mean gradient of both workers
    assert max((first[name] - rank0_only[name]).abs().max().item() for name in both) > lr  # not one worker's

    # A run stopped after step 3 (its checkpoint), started again: it continues where it stopped.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-0000003", resumed / "checkpoint-0000003")
    lines: list[str] = []
    summary = train(two_workers(resumed), log=lines.append)
    assert summary.first_step == 3 and lines[0].startswith("resuming from") and "(step 3)" in lines[0]
    again = {record["step"]: record["loss"] for record in read_log(str(resumed), {})}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # the earlier records come with the checkpoint
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(losses[step], rel=1e-5), step
    for name, value in load_model(str(resumed / "checkpoint-0000006")).state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_bad_training_configs_are_refused_before_any_ray_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.config: .*hidden_size"):
        train({**config(tmp_path), "model": {"config": {**TINY, "hidden_size": "wide"}}})
    with pytest.raises(ConfigError, match="model: give model.checkpoint .* or model.config"):
        train({**config(tmp_path), "model": {}})
    with pytest.raises(ConfigError, match="train.steps: expected an int > 0"):
        train(config(tmp_path), ("train.steps=0",))
    path = tmp_path / "train.yaml"
    path.write_text(f"model:\n  checkpoint: {tmp_path / 'nowhere'}\noutput:\n  uri: {tmp_path / 'out'}\n")
    assert cli(["train", str(path)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synthetic_tasks_are_pairs_of_one_task_with_every_class():
    rng = np.random.default_rng(0)
    task = random_task(rng, num_classes=3)
    assert len({look.shape for look in task.classes}) == 3  # classes differ in shape and colour
    image, labels = render(task, rng, (64, 48))
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8 and labels.shape == (64, 48)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    for i, look in enumerate(task.classes, start=1):  # a class's pixels have its colour (up to texture)
        assert np.linalg.norm(np.median(image[labels == i], axis=0) - look.colour) < 60
    prompt, prompt_labels, target, target_labels = task_pair(np.random.default_rng(1), (32, 32), num_classes=2)
    assert set(np.unique(prompt_labels)) == set(np.unique(target_labels)) == {0, 1, 2}
    assert not np.array_equal(prompt, target)
    batch = synthetic_batch(seed=0, step=0, rank=0, batch_size=3, size=(32, 32))
    assert {name: tuple(value.shape) for name, value in batch.items()} == {
        name: (3, 3, 32, 32) for name in ("pixel_values", "prompt_pixel_values", "prompt_masks", "labels")
    }
    assert torch.equal(batch["labels"], synthetic_batch(0, 0, 0, 3, (32, 32))["labels"])  # seeded by step and rank
    assert not torch.equal(batch["labels"], synthetic_batch(0, 0, 1, 3, (32, 32))["labels"])


def test_the_demo_training_config_loads():
    from pipeline.training import load_train_config

    config = load_train_config(Path(__file__).parents[1] / "jobs" / "configs" / "train-demo.yaml")
    model = SegGpt(SegGptConfig.from_dict(config.model.config))
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6  # a few million parameters
    assert model.config.input_size == (64, 64) and config.model.checkpoint is None
