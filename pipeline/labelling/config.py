"""The auto-labelling job's config (`load_config`), validated before any Ray work starts; jobs/configs/example.yaml
shows and explains every key. `auto` values (`model.dtype`, `model.attention`, `compute.gpus_per_actor`) are kept
as given: they are resolved later, against the cluster the job runs on (`pipeline.labelling.job.resolve_compute`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import NonNegativeFloat, PositiveInt, field_validator, model_validator

from pipeline.config import (
    LIST_AS_TUPLE,
    Config,
    ConfigSource,
    Format,
    Gpus,
    Location,
    Locations,
    ModelConfig,
    Section,
    StorageConfig,
    Text,
    describe,
    load,
)
from pipeline.labelling.preprocess import DEFAULT_MAX_PIXELS
from pipeline.prompts import PromptsConfig


class InputConfig(Section):
    uri: Locations
    manifest: Location | None = None  # the inputs' keys under `uri` (pipeline.storage.manifest): nothing is listed
    format: Format = "auto"
    image_column: Text = "image"
    exif_transpose: bool = True
    jpeg_draft: bool = False
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # more are refused before decoding; Pillow's own limit is 179 M
    config_key: ClassVar[str] = "input.uri"  # named in listing errors

    @model_validator(mode="after")
    def _one_root(self) -> InputConfig:
        if self.manifest and not isinstance(self.uri, str):
            raise ValueError("with input.manifest, input.uri is one URI: the folder its keys are relative to")
        return self

    @property
    def uris(self) -> tuple[str, ...]:
        """`uri` as a tuple, whether one URI or a list was given."""
        return (self.uri,) if isinstance(self.uri, str) else self.uri


class JobModelConfig(ModelConfig):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "sdpa", "flex", "chunked"] = "auto"


class OutputConfig(Section):
    uri: Location
    png: bool = True
    resume: bool = True
    rows_per_file: PositiveInt = 256  # also resume's step
    file_mb: NonNegativeFloat = 128  # the run's labels files merged to about this size at its end; 0: as written
    on_mismatch: Literal["refuse", "relabel"] = "refuse"


class ComputeConfig(Section):
    batch_size: PositiveInt = 8
    actors: Annotated[tuple[PositiveInt, PositiveInt], LIST_AS_TUPLE] = (1, 1)
    gpus_per_actor: Gpus = "auto"
    cpus_per_actor: NonNegativeFloat = 1.0
    cpus_per_task: NonNegativeFloat = 1.0
    gpu_wait_s: NonNegativeFloat = 0.0

    @field_validator("actors", mode="wrap")
    @classmethod
    def _min_max(cls, actors: Any, check: Any) -> tuple[int, int]:
        if not isinstance(actors, (list, tuple)) or len(actors) != 2:
            raise ValueError(f"expected [min, max], got {describe(actors)}")
        low, high = check(actors)
        if low > high:
            raise ValueError(f"min {low} is greater than max {high}")
        return low, high


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
