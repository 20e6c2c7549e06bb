"""The job's prompts section and the in-context tuning config (`load_tune_config`; jobs/configs/tune.yaml)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import NonNegativeFloat, PositiveInt, field_validator

from pipeline.config import (
    LIST_AS_TUPLE,
    Config,
    ConfigSource,
    Location,
    Locations,
    ModelConfig,
    Section,
    Text,
    describe,
    load,
)
from pipeline.training import LabelledDataConfig, TrainComputeConfig, TrainOutputConfig


class PromptsConfig(Section):
    uri: Location
    classes: Annotated[tuple[Text, ...], LIST_AS_TUPLE]
    mask_format: Literal["labels", "rgb"] = "labels"
    embedding: Literal["semantic", "instance"] = "semantic"

    @field_validator("classes", mode="wrap")
    @classmethod
    def _distinct_names(cls, classes: Any, check: Any) -> tuple[str, ...]:
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ValueError(f"expected a non-empty list of class names, got {describe(classes)}")
        names = check(classes)
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"duplicate class names {duplicates}")
        return names


class TunePromptConfig(PromptsConfig):
    name: Text | None = None  # which prompt of `uri` to start from; default: the first


class TuneDataConfig(LabelledDataConfig):
    uri: Locations
    val_fraction: NonNegativeFloat = 0.25


class TuneLoopConfig(Section):
    steps: PositiveInt = 200
    batch_size: PositiveInt = 8
    lr: NonNegativeFloat = 0.01
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 50


class TuneConfig(Config):
    model: ModelConfig
    prompt: TunePromptConfig
    data: TuneDataConfig
    output: TrainOutputConfig
    train: TuneLoopConfig = TuneLoopConfig()
    compute: TrainComputeConfig = TrainComputeConfig()


def load_tune_config(source: ConfigSource, overrides: Sequence[str] = ()) -> TuneConfig:
    """The tuning config, read and checked like the job's (`pipeline.labelling.load_config`)."""
    return load(source, overrides, TuneConfig)
