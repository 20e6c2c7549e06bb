"""The prompts section of the job's config, and the in-context tuning config (`seggpt-autolabel tune`,
`load_tune_config`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import NonNegativeFloat, PositiveInt, field_validator

from pipeline.config import LIST_AS_TUPLE, Config, ConfigSource, Location, Locations, ModelConfig, Section, Text
from pipeline.config import describe, load
from pipeline.training import LabelledDataConfig, TrainComputeConfig, TrainOutputConfig


class PromptsConfig(Section):
    uri: Location
    classes: Annotated[tuple[Text, ...], LIST_AS_TUPLE]
    mask_format: Literal["labels", "rgb"] = "labels"
    embedding: Literal["semantic", "instance"] = "semantic"

    @field_validator("classes", mode="before")
    @classmethod
    def _a_list(cls, classes: object) -> object:
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ValueError(f"expected a non-empty list of class names, got {describe(classes)}")
        return classes

    @field_validator("classes")
    @classmethod
    def _no_duplicates(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        duplicates = sorted({name for name in classes if classes.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate class names {duplicates}")
        return classes


class TunePromptConfig(PromptsConfig):
    """The prompt to start from: a prompt folder, manifest or tuned prompt file, as prompts.uri takes."""

    name: Text | None = None  # which prompt of it; default: the first


class TuneDataConfig(LabelledDataConfig):
    uri: Locations  # the labelled pool (pipeline.storage.pairs)
    val_fraction: NonNegativeFloat = 0.25  # of the pool, by key: the same split as select-prompts'


class TuneLoopConfig(Section):
    steps: PositiveInt = 200
    batch_size: PositiveInt = 8  # target images per worker and step
    lr: NonNegativeFloat = 0.01  # Adam, on the prompt's normalised pixels
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 50


class TuneConfig(Config):
    model: ModelConfig  # frozen
    prompt: TunePromptConfig
    data: TuneDataConfig
    output: TrainOutputConfig
    train: TuneLoopConfig = TuneLoopConfig()
    compute: TrainComputeConfig = TrainComputeConfig()


def load_tune_config(source: ConfigSource, overrides: Sequence[str] = ()) -> TuneConfig:
    """The tuning config, read and checked like the job's (`pipeline.labelling.load_config`)."""
    return load(source, overrides, TuneConfig)
