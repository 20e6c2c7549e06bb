"""In-context training on Ray Train: `TorchTrainer` with a plain loop, one CPU here or many GPUs on a cluster.

Each worker draws its own pairs of synthetic tasks (`pipeline.training.synthetic`) for every step, seeded by (data seed,
step, rank), so a run resumed from a checkpoint sees the data it would have seen; or, with `data.uri`, pairs of
labelled images of the user's data (`pipeline.storage.pairs`, through Ray Data: each batch of 2B usable samples makes B
pairs, prompt and target; unusable samples are skipped and counted as `skipped`). Gradients meet through DDP;
bfloat16 autocast on GPU. Rank 0 writes `checkpoint-<step>/` under `output.uri`: `config.json` and
`model.safetensors` (what `load_model` reads) and `trainer.pt` (optimizer state and step, written last: a
checkpoint without it is incomplete and ignored), and `train_log.jsonl` (loss, learning rate and samples/s of
every logged step, earlier runs of the same output included). A run starts from the latest complete checkpoint
under `output.uri` when there is one, else from `model.checkpoint`, else from random weights of `model.config`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from model import SegGpt, SegGptConfig, check_checkpoint, load_model
from model.training import pair_batch, save_checkpoint
from pipeline.config import ConfigError
from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_labelled
from pipeline.training.checkpoints import (
    IntervalReport,
    latest_checkpoint,
    read_log,
    read_trainer_state,
    write_checkpoint,
)
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.synthetic import task_pair

_MIN_LR_SHARE = 0.1  # the cosine schedule ends at this share of `train.lr`


@dataclass
class TrainSummary:
    steps: int
    first_step: int  # where this run started (0, or the step of the checkpoint it resumed)
    loss: float  # mean over the last logged interval
    seconds: float  # wall time of the run, Ray Train's start included
    samples_per_second: float
    checkpoint: str

    def __str__(self) -> str:
        return (
            f"trained steps {self.first_step}..{self.steps}: loss {self.loss:.4f}, {self.seconds:.0f} s, "
            f"{self.samples_per_second:.1f} samples/s; checkpoint: {self.checkpoint}"
        )


def synthetic_batch(seed: int, step: int, rank: int, batch_size: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The training pairs of one worker and step: `SegGpt.forward` keyword arguments (labels included)."""
    rng = np.random.default_rng([seed, step, rank])
    pairs = [task_pair(rng, size) for _ in range(batch_size)]
    prompt_images, prompt_labels, images, labels = (np.stack(part) for part in zip(*pairs))
    return pair_batch(prompt_images, prompt_labels, images, labels, rng)


def train(
    config: TrainConfig | dict | str | os.PathLike,
    overrides: tuple[str, ...] = (),
    *,
    log: Callable[[str], None] = print,
) -> TrainSummary:
    """Check the config and the starting model (before any Ray work), then train on Ray Train."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config, overrides)
    options, data = config.storage_options, config.data
    resume = latest_checkpoint(config.output.uri, options)
    if resume is not None:
        log(f"resuming from {resume[0]} (step {resume[1]})")
    model_config = _starting_config(config, resume)
    if data.uri is not None:
        source = LabelledSource(data.uri, data.format, data.image_column, data.mask_column, data.mask_field)
        items = labelled_pairs(source, options, data.num_classes)

    if not ray.is_initialized():
        ray.init(configure_logging=False)  # RAY_ADDRESS, a running cluster, or a new local one
    gpus = config.compute.gpus_per_worker
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if gpus == "auto" else float(gpus) > 0
    resources = {"CPU": config.compute.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    # Ray Train holds its workers' CPUs for the whole fit: where they are all the cluster has free, read tasks that
    # ask for a CPU would wait forever, so they ask for none and share the workers' cores.
    spare_cpus = ray.available_resources().get("CPU", 0) - config.compute.workers * config.compute.cpus_per_worker
    datasets = (
        {}
        if data.uri is None
        else {
            "train": read_labelled(
                items,
                source,
                options,
                model_config.input_size,
                data.num_classes,
                num_cpus=0.5 if spare_cpus >= 0.5 else 0,
            )
        }
    )
    trainer = TorchTrainer(
        _train_loop,
        datasets=datasets,
        train_loop_config={"config": config.to_dict(redact=False), "resume": None if resume is None else list(resume)},
        scaling_config=ScalingConfig(
            num_workers=config.compute.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
    )
    started = time.monotonic()
    trainer.fit()
    records = read_log(config.output.uri, options)
    this_run = [record for record in records if record["step"] > (0 if resume is None else resume[1])]
    final = latest_checkpoint(config.output.uri, options)
    trained = (config.train.steps - (0 if resume is None else resume[1])) * config.train.batch_size
    seconds = time.monotonic() - started
    return TrainSummary(
        steps=config.train.steps,
        first_step=0 if resume is None else resume[1],
        loss=this_run[-1]["loss"] if this_run else math.nan,
        seconds=seconds,
        samples_per_second=trained * config.compute.workers / seconds,
        checkpoint=final[0] if final else "",
    )


def _starting_config(config: TrainConfig, resume: tuple[str, int] | None) -> SegGptConfig:
    """The architecture training starts from, checked: the checkpoint resumed, `model.checkpoint` or `model.config`."""
    options = config.storage_options
    if resume is not None:
        return check_checkpoint(resume[0], storage_options=options)
    if config.model.checkpoint is not None:
        return check_checkpoint(config.model.checkpoint, storage_options=options)
    if config.model.config is None:
        raise ConfigError("model: give model.checkpoint (a checkpoint to start from) or model.config (random weights)")
    try:
        return SegGptConfig.from_dict(config.model.config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.config: {error}") from None


def _starting_model(config: TrainConfig, resume: list | None) -> SegGpt:
    """The model training starts from: the checkpoint resumed, `model.checkpoint`, or random weights."""
    if resume is not None:
        return load_model(resume[0], storage_options=config.storage_options)
    if config.model.checkpoint is not None:
        return load_model(config.model.checkpoint, storage_options=config.storage_options)
    return SegGpt(SegGptConfig.from_dict(config.model.config))


def _batches(config: TrainConfig, first_step: int, rank: int, size: tuple[int, int]) -> Iterator[tuple[dict, int]]:
    """The worker's training batches from `first_step` on, and the count of samples skipped so far: synthetic tasks,
    or its shard of the labelled pool."""
    loop, seed = config.train, config.data.seed
    if config.data.uri is None:
        return ((synthetic_batch(seed, step, rank, loop.batch_size, size), 0) for step in range(first_step, loop.steps))
    rng = np.random.default_rng([seed, first_step, rank])
    return _labelled_batches(ray.train.get_dataset_shard("train"), loop.batch_size, rng)


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker."""
    config = load_train_config(loop_config["config"])
    options, loop = config.storage_options, config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    resume = loop_config["resume"]

    torch.manual_seed(config.data.seed)
    plain_model = _starting_model(config, resume).train()
    model = ray.train.torch.prepare_model(plain_model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    first_step, records = 0, []
    if resume is not None:
        state = read_trainer_state(resume[0], options)
        optimizer.load_state_dict(state["optimizer"])
        first_step, records = state["step"], state["records"]

    batches = _batches(config, first_step, rank, plain_model.config.input_size)
    report = IntervalReport("step", loop.steps, loop.log_every, loop.batch_size * world, rank, records)
    for step, (batch, skipped) in zip(range(first_step, loop.steps), batches):
        torch.manual_seed(config.data.seed * 1_000_003 + step * world + rank)  # drop-path, the same on a resume
        batch = {name: value.to(device) for name, value in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, loop.steps, loop.warmup_steps, loop.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch, embedding_type="semantic").loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        done = step + 1
        report.add(done, loss.item(), lr=optimizer.param_groups[0]["lr"], skipped=skipped)
        if rank == 0 and (done % loop.checkpoint_every == 0 or done == loop.steps):
            write_checkpoint(
                config.output.uri,
                options,
                done,
                lambda uri: save_checkpoint(plain_model, uri, options),
                optimizer,
                records,
            )


def _labelled_batches(shard: Any, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[dict, int]]:
    """Endless pair batches from a Ray Data shard of `read_labelled` rows, and the count of samples skipped so far."""
    skipped, pending = 0, []
    while True:
        usable_in_pass = 0
        for rows in shard.iter_batches(
            batch_size=2 * batch_size, batch_format="numpy", local_shuffle_buffer_size=8 * batch_size
        ):
            usable = rows["error"] == ""
            skipped += int((~usable).sum())
            usable_in_pass += int(usable.sum())
            pending += [(rows["image"][i], rows["labels"][i]) for i in np.flatnonzero(usable)]
            while len(pending) >= 2 * batch_size:
                take, pending = pending[: 2 * batch_size], pending[2 * batch_size :]
                images, labels = (np.stack(part) for part in zip(*take))
                yield (
                    pair_batch(images[:batch_size], labels[:batch_size], images[batch_size:], labels[batch_size:], rng),
                    skipped,
                )
        if usable_in_pass == 0:
            raise ValueError(f"no usable labelled pairs in this worker's share of the data ({skipped} skipped)")


def _learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then a cosine down to `_MIN_LR_SHARE` of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (_MIN_LR_SHARE + (1 - _MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))
