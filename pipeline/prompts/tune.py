"""`tune`: in-context tuning on Ray Train. The model stays frozen; only a prompt pair is learnt.

The prompt (an image and a mask tensor at the model's input size, normalised) starts from a chosen prompt of a
prompt set and is optimised with Adam on the training objective (the model's smooth-L1 on the painted target half),
over the training part of a labelled pool (`pipeline.prompts.scoring.split_rows`: the validation part is held out,
the same keys as `select-prompts` holds out with the same seed and fraction). Targets are painted with the job's class
palette, so the prompt learns the colours the labelling job reads back. Gradients meet through DDP when there are
several workers; bfloat16 autocast on GPU.

Rank 0 writes `checkpoint-<step>/prompt.safetensors` and `trainer.pt` under `output.uri` (a run resumes from the
latest), and `train_log.jsonl`. At the end the starting prompt and every checkpoint's are scored on the validation
part (through the model, as the job labels), and the best (the earliest of equals; the starting prompt when no step
beat it) becomes `output.uri/tuned.safetensors`, a file `prompts.uri` takes alone or in a prompt folder: the loss is
not the label, and a prompt can overfit a small pool. The starting and the chosen prompt's scores on both parts, and
the validation score of every checkpoint, are written to `output.uri/tune_report.json`.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import DataConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from model import check_checkpoint, load_model
from model.processing import build_palette, normalize
from pipeline.config import ConfigError
from pipeline.prompts.config import TuneConfig, load_tune_config
from pipeline.prompts.scoring import PromptScorer, scores, split_rows
from pipeline.prompts.sets import PromptSetError, load_prompt_set, read_tuned_prompt, tuned_prompt_bytes
from pipeline.results import Evaluation
from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_labelled
from pipeline.training import (
    IntervalReport,
    complete_checkpoints,
    latest_checkpoint,
    read_log,
    read_trainer_state,
    write_checkpoint,
)

PROMPT_FILE = "prompt.safetensors"
TUNED_FILE = "tuned.safetensors"
REPORT_FILE = "tune_report.json"


@dataclass
class TuneSummary:
    steps: int
    first_step: int  # where this run started (0, or the step it resumed)
    loss: float  # mean over the last logged interval
    chosen_step: int  # the checkpoint whose prompt scored best on the validation part (0: the starting prompt)
    scores: dict[str, dict[str, float]]  # {"training" | "validation": {"before": mIoU, "after": mIoU}}
    seconds: float
    tuned: str  # the tuned prompt file

    def __str__(self) -> str:
        lines = [
            f"tuned steps {self.first_step}..{self.steps}: loss {self.loss:.4f}, {self.seconds:.0f} s; "
            f"best on validation: step {self.chosen_step}",
            f"{'mean IoU':<12}{'before':>8}{'after':>8}",
        ]
        lines += [f"{part:<12}{s['before']:>8.3f}{s['after']:>8.3f}" for part, s in self.scores.items()]
        return "\n".join([*lines, f"tuned prompt: {self.tuned} (prompts.uri, alone or in a prompt folder)"])


class LearnablePrompt(nn.Module):
    """A prompt pair as parameters: image and mask, (3, H, W) each, normalised."""

    def __init__(self, image: np.ndarray, mask: np.ndarray) -> None:
        super().__init__()
        self.image = nn.Parameter(torch.from_numpy(np.array(image, np.float32)))
        self.mask = nn.Parameter(torch.from_numpy(np.array(mask, np.float32)))

    def forward(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair for `rows` targets: (rows, 3, H, W) each, views of the parameters."""
        return self.image.expand(rows, -1, -1, -1), self.mask.expand(rows, -1, -1, -1)


def tune(
    config: TuneConfig | dict | str | os.PathLike,
    overrides: tuple[str, ...] = (),
    *,
    log: Callable[[str], None] = print,
) -> TuneSummary:
    """Check the config, model, starting prompt and pool (before any Ray work), then tune on Ray Train."""
    if not isinstance(config, TuneConfig):
        config = load_tune_config(config, overrides)
    options, data, chosen = config.storage_options, config.data, config.prompt
    if not 0 < data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: expected a number between 0 and 1, got {data.val_fraction}")
    size = check_checkpoint(config.model.checkpoint, storage_options=options).input_size
    start, name = _starting_prompt(config, size)
    source = LabelledSource(
        data.uri, data.format, data.image_column, data.mask_column, data.mask_field, classes=tuple(chosen.classes)
    )
    items = labelled_pairs(source, options, len(chosen.classes))
    resume = latest_checkpoint(config.output.uri, options)
    if resume is not None:
        log(f"resuming from {resume[0]} (step {resume[1]})")

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    pool = read_labelled(items, source, options, size, len(chosen.classes)).materialize()
    rows = split_rows(pool, data.val_fraction, data.seed, len(chosen.classes) + 1).materialize()
    started = time.monotonic()
    _fit(config, rows, start, f"{chosen.uri}#{name}", resume)

    log("tune: scoring the starting prompt and every checkpoint's on the validation part")
    steps, tuned = _checkpoint_prompts(config.output.uri, options, chosen.classes, chosen.embedding, size)
    candidates = (
        np.stack([start[0], *(image for image, _ in tuned)]),
        np.stack([start[1], *(mask for _, mask in tuned)]),
    )
    curve, parts, best = _score_candidates(config, candidates, rows.to_numpy_refs())
    chosen_step = ([0] + steps)[best]
    data = tuned_prompt_bytes(
        torch.from_numpy(candidates[0][best]),
        torch.from_numpy(candidates[1][best]),
        classes=chosen.classes,
        embedding=chosen.embedding,
        started_from=f"{chosen.uri}#{name}",
        model=config.model.checkpoint,
        step=chosen_step,
    )
    fs, root = fsspec.core.url_to_fs(config.output.uri, **options)
    fs.pipe_file(f"{root}/{TUNED_FILE}", data)
    records = [r for r in read_log(config.output.uri, options) if r["step"] > (0 if resume is None else resume[1])]
    report = {
        "prompt": {"uri": chosen.uri, "name": name},
        "steps": config.train.steps,
        "chosen_step": chosen_step,
        "validation_by_step": {step: e.mean_iou for step, e in zip([0] + steps, curve)},
        **{part: {"before": scores(before), "after": scores(after)} for part, (before, after) in parts.items()},
    }
    fs.pipe_file(f"{root}/{REPORT_FILE}", (json.dumps(report, indent=2) + "\n").encode())
    return TuneSummary(
        steps=config.train.steps,
        first_step=0 if resume is None else resume[1],
        chosen_step=chosen_step,
        loss=records[-1]["loss"] if records else float("nan"),
        scores={part: {"before": before.mean_iou, "after": after.mean_iou} for part, (before, after) in parts.items()},
        seconds=time.monotonic() - started,
        tuned=f"{config.output.uri.rstrip('/')}/{TUNED_FILE}",
    )


def _tune_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker."""
    config = load_tune_config(loop_config["config"])
    options, loop, chosen = config.storage_options, config.train, config.prompt
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    resume = loop_config["resume"]

    model = load_model(config.model.checkpoint, device=device, storage_options=options).eval().requires_grad_(False)
    start, first_step, records = loop_config["start"], 0, []
    if resume is not None:
        start = read_tuned_prompt(
            _read(f"{resume[0]}/{PROMPT_FILE}", options),
            resume[0],
            classes=chosen.classes,
            embedding=chosen.embedding,
            size=model.config.input_size,
        )
    plain_prompt = LearnablePrompt(*start)
    prompt = ray.train.torch.prepare_model(plain_prompt)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=loop.lr)
    if resume is not None:
        state = read_trainer_state(resume[0], options)
        optimizer.load_state_dict(state["optimizer"])
        first_step, records = state["step"], state["records"]

    palette = torch.from_numpy(build_palette(len(chosen.classes)))
    shard = ray.train.get_dataset_shard("train")
    report = IntervalReport("tune step", loop.steps, loop.log_every, loop.batch_size * world, rank, records)
    batches = _target_batches(shard, loop.batch_size, seed=config.data.seed * 1_000_003 + rank)
    for step, (images, labels) in zip(range(first_step, loop.steps), batches):
        targets = normalize(torch.from_numpy(images).to(device))
        painted = normalize(palette[torch.from_numpy(labels).long()].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(targets, *prompt(len(targets)), labels=painted, embedding_type=chosen.embedding).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        done = step + 1
        report.add(done, loss.item())
        if rank == 0 and (done % loop.checkpoint_every == 0 or done == loop.steps):
            data = tuned_prompt_bytes(
                plain_prompt.image,
                plain_prompt.mask,
                classes=chosen.classes,
                embedding=chosen.embedding,
                started_from=loop_config["started_from"],
                model=config.model.checkpoint,
                step=done,
            )
            write_checkpoint(
                config.output.uri,
                options,
                done,
                lambda uri, data=data: _write(f"{uri}/{PROMPT_FILE}", data, options),
                optimizer,
                records,
            )


def _starting_prompt(config: TuneConfig, size: tuple[int, int]) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """The (image, mask) of the prompt tuning starts from, as uint8 arrays at the model's input size, and its name."""
    chosen = config.prompt
    prompt_set = load_prompt_set(
        chosen.uri,
        classes=chosen.classes,
        mask_format=chosen.mask_format,
        embedding=chosen.embedding,
        size=size,
        storage_options=config.storage_options,
    )
    name = chosen.name or prompt_set.names[0]
    if name not in prompt_set.names:
        raise PromptSetError(f"prompt.name: {name!r} is not in {chosen.uri} (it has {list(prompt_set.names)})")
    images, masks = prompt_set.tensors()
    index = prompt_set.names.index(name)
    return (images[index].numpy(), masks[index].numpy()), name


def _fit(
    config: TuneConfig,
    rows: ray.data.Dataset,
    start: tuple[np.ndarray, np.ndarray],
    started_from: str,
    resume: tuple[str, int] | None,
) -> None:
    """Tune the prompt on Ray Train, on the training part of `rows`."""
    # materialized, so that feeding the workers takes no CPU that they hold (a worker may take every CPU of a node)
    train_rows = rows.filter(lambda row: not row["validation"] and row["error"] == "", num_cpus=0.5).materialize()
    gpus = config.compute.gpus_per_worker
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if gpus == "auto" else float(gpus) > 0
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # with the seeded shuffle of each worker: the same data in the same order each run
    trainer = TorchTrainer(
        _tune_loop,
        datasets={"train": train_rows},
        dataset_config=DataConfig(execution_options=ingest),
        train_loop_config={
            "config": config.to_dict(redact=False),
            "start": start,
            "started_from": started_from,
            "resume": None if resume is None else list(resume),
        },
        scaling_config=ScalingConfig(
            num_workers=config.compute.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.compute.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})},
        ),
    )
    trainer.fit()


def _score_candidates(
    config: TuneConfig,
    candidates: tuple[np.ndarray, np.ndarray],
    blocks: list[ray.ObjectRef],
) -> tuple[list[Evaluation], dict[str, list[Evaluation]], int]:
    """Each candidate's validation score (the curve), the best one (the first of equals: the earliest), and the
    first candidate's and the best's scores on each part."""
    chosen = config.prompt
    scorer = PromptScorer(
        config.model.checkpoint,
        candidates,
        classes=chosen.classes,
        embedding=chosen.embedding,
        storage_options=config.storage_options,
    )
    try:
        curve = scorer.score(blocks, [[i] for i in range(len(candidates[0]))], validation=True)
        best = int(np.argmax([evaluation.mean_iou for evaluation in curve]))
        parts = {
            "training": scorer.score(blocks, [[0], [best]], validation=False),
            "validation": [curve[0], curve[best]],
        }
    finally:
        scorer.close()
    return curve, parts, best


def _checkpoint_prompts(
    output_uri: str, storage_options: dict[str, Any], classes: tuple[str, ...], embedding: str, size: tuple[int, int]
) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """The steps of the complete checkpoints under `output_uri`, oldest first, and their prompts."""
    checkpoints = complete_checkpoints(output_uri, storage_options)
    prompts = [
        read_tuned_prompt(
            _read(f"{uri}/{PROMPT_FILE}", storage_options),
            f"{uri}/{PROMPT_FILE}",
            classes=classes,
            embedding=embedding,
            size=size,
        )
        for uri, _ in checkpoints
    ]
    return [step for _, step in checkpoints], prompts


def _read(uri: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs.cat_file(path)


def _write(uri: str, data: bytes, storage_options: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)


def _target_batches(shard: Any, batch_size: int, seed: int):
    """Endless (images uint8 (B, H, W, 3), label maps (B, H, W)) batches of a worker's share of the training rows,
    shuffled within a window, differently each pass."""
    for epoch in itertools.count():
        seen = 0
        for rows in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
        ):
            seen += len(rows["key"])
            yield rows["image"], rows["labels"]
        if seen == 0:
            raise ValueError(f"no training images in this worker's share of the pool (batches of {batch_size})")
