"""The training config (`load_train_config`; jobs/configs/train-demo.yaml), and the sections tuning shares with it:
the output and compute of Ray Train workers, the layout of labelled pairs (pipeline.storage.pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from pipeline.config import Checkpoint, Config, ConfigSource, Format, Gpus, Location, Locations, Section, Text, load


class TrainModelConfig(Section):
    checkpoint: Checkpoint | None = None  # start from it; else random weights of `config` (SegGptConfig fields)
    config: dict[str, Any] | None = None


class LabelledDataConfig(Section):
    format: Format = "auto"
    image_column: Text = "image"
    mask_column: Text = "mask"
    mask_field: Text = "seg.png"
    seed: NonNegativeInt = 0


class TrainDataConfig(LabelledDataConfig):
    uri: Locations | None = None  # labelled pairs; else synthetic tasks (pipeline.training.synthetic)
    num_classes: PositiveInt = 255  # labels above it are refused


class TrainLoopConfig(Section):
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 16
    lr: NonNegativeFloat = 3e-4
    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: NonNegativeInt = 100
    log_every: PositiveInt = 20
    checkpoint_every: PositiveInt = 500


class TrainOutputConfig(Section):
    uri: Location  # checkpoint-<step>/ folders that load_model reads, and train_log.jsonl


class TrainComputeConfig(Section):
    workers: PositiveInt = 1
    gpus_per_worker: Gpus = "auto"
    cpus_per_worker: NonNegativeFloat = 1.0


class TrainConfig(Config):
    model: TrainModelConfig
    output: TrainOutputConfig
    data: TrainDataConfig = TrainDataConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    compute: TrainComputeConfig = TrainComputeConfig()


def load_train_config(source: ConfigSource, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config, read and checked like the job's (`pipeline.labelling.load_config`)."""
    return load(source, overrides, TrainConfig)
