"""The auto-labelling job's config (`load_config`): one YAML file, validated before any Ray work starts.

`auto` values (`model.dtype`, `model.attention`, `compute.gpus_per_actor`) are kept as given: they are resolved
later, against the cluster the job runs on (`pipeline.labelling.job.resolve_compute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import NonNegativeFloat, PositiveInt, field_validator

from pipeline.config import LIST_AS_TUPLE, Config, ConfigSource, Format, Gpus, Location, Locations, ModelConfig
from pipeline.config import Section, StorageConfig, Text, describe, load
from pipeline.labelling.preprocess import DEFAULT_MAX_PIXELS
from pipeline.prompts import PromptsConfig


class InputConfig(Section):
    uri: Locations
    format: Format = "auto"
    image_column: Text = "image"
    exif_transpose: bool = True  # turn images as their EXIF orientation says
    # decode JPEGs at 1/2, 1/4 or 1/8 scale where that is still at least the model's size: faster, not exact
    jpeg_draft: bool = False
    # images whose header declares more pixels are error rows, refused before decoding (decompression bombs);
    # Pillow itself refuses more than twice its MAX_IMAGE_PIXELS (179 M)
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS

    @property
    def uris(self) -> tuple[str, ...]:
        """`uri` as a tuple, whether one URI or a list was given."""
        return (self.uri,) if isinstance(self.uri, str) else self.uri


class JobModelConfig(ModelConfig):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "sdpa", "flex"] = "auto"  # auto: flex on CUDA, sdpa on the CPU


class OutputConfig(Section):
    uri: Location
    png: bool = True
    resume: bool = True
    rows_per_file: PositiveInt = 256  # rows of one labels/ Parquet file; also resume's step
    # labels in the output made by another model or prompt set: refuse to resume (exit 2), or relabel them
    on_mismatch: Literal["refuse", "relabel"] = "refuse"


class ComputeConfig(Section):
    batch_size: PositiveInt = 8
    actors: Annotated[tuple[PositiveInt, PositiveInt], LIST_AS_TUPLE] = (1, 1)
    gpus_per_actor: Gpus = "auto"
    cpus_per_actor: NonNegativeFloat = 1.0
    cpus_per_task: NonNegativeFloat = 1.0  # each preprocess and postprocess task (decode, resize, PNG)
    # with `auto` (gpus_per_actor, dtype) on a cluster without GPUs whose autoscaler reports no GPU node types: how
    # long to wait for a GPU node to join before settling on the CPU
    gpu_wait_s: NonNegativeFloat = 0.0

    @field_validator("actors", mode="before")
    @classmethod
    def _min_max(cls, actors: object) -> object:
        if not isinstance(actors, (list, tuple)) or len(actors) != 2:
            raise ValueError(f"expected [min, max], got {describe(actors)}")
        return actors

    @field_validator("actors")
    @classmethod
    def _ordered(cls, actors: tuple[int, int]) -> tuple[int, int]:
        if actors[0] > actors[1]:
            raise ValueError(f"min {actors[0]} is greater than max {actors[1]}")
        return actors


class JobConfig(Config):
    input: InputConfig
    prompts: PromptsConfig
    model: JobModelConfig
    output: OutputConfig
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()


def load_config(source: ConfigSource, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML file (or take a dict), apply `section.key=value` overrides and validate it all."""
    return load(source, overrides, JobConfig)
