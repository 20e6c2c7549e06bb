"""The auto-labelling job's configuration: one YAML file, validated before any Ray work starts.

`load_config` reads a YAML file (or takes an already-parsed dict), applies `--set section.key=value`
overrides and checks every key and type. Every problem is a `ConfigError` whose message starts with
the dotted key, e.g. ``compute.batch_size: expected int, got 'x'`` or ``input.fromat: unknown key``.
`auto` values (`model.dtype`, `model.attention`, `compute.gpus_per_actor`) are kept as given: they are resolved
later, against the cluster the job runs on (`pipeline.job.resolve_compute`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import fsspec
import yaml

from pipeline.preprocess import DEFAULT_MAX_PIXELS
from pipeline.storage import DEFAULT_RETRY_S

_REQUIRED: Any = object()
_SECRET_MARKERS = ("secret", "token", "key", "password", "credential", "connection_string")


class ConfigError(ValueError):
    """A bad job configuration; the message names the dotted key at fault."""


# --- value checks: each takes (dotted key, raw value) and returns the stored value ---------------


def _describe(value: Any) -> str:
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    return type(value).__name__


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_describe(value)}")
    return value


def _location(key: str, value: Any) -> str:
    return absolute_uri(_string(key, value))


def absolute_uri(uri: str) -> str:
    """A URI; a local path is made absolute here, on the driver, since Ray's workers run in folders of their own."""
    if fsspec.core.split_protocol(uri)[0] not in (None, "file", "local"):
        return uri
    return os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(uri)))


def _locations(key: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: expected a string or a non-empty list of strings, got []")
        return tuple(_location(f"{key}[{i}]", item) for i, item in enumerate(value))
    return _location(key, value)


def _class_names(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of class names, got {_describe(value)}")
    names = tuple(_string(f"{key}[{i}]", item) for i, item in enumerate(value))
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{key}: duplicate class names {duplicates}")
    return names


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
    if value < 0:
        raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected int, got {_describe(value)}")
    if value <= 0:
        raise ConfigError(f"{key}: expected an int > 0, got {value!r}")
    return value


def _actor_range(key: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{key}: expected [min, max], got {_describe(value)}")
    low, high = (_positive_int(f"{key}[{i}]", item) for i, item in enumerate(value))
    if low > high:
        raise ConfigError(f"{key}: min {low} is greater than max {high}")
    return low, high


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected an int >= 0, got {_describe(value)}")
    return value


def _gpus(key: str, value: Any) -> str | float:
    return "auto" if value == "auto" else _number(key, value)


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
    return copy.deepcopy(value)


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ConfigError(f"{key}: expected one of {' | '.join(options)}, got {_describe(value)}")
        return value

    return check


def _option(check: Callable[[str, Any], Any], default: Any = _REQUIRED) -> Any:
    """A dataclass field validated by `check`; without a default the key is required."""
    if default is _REQUIRED:
        return field(metadata={"check": check})
    return field(default=default, metadata={"check": check})


# --- sections ---------------------------------------------------------------------------------


class _Dumpable:
    """A whole config (job, training or tuning)."""

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The config as plain YAML/JSON-ready data; with `redact`, secrets in storage_options are '***'."""
        return _as_dict(self, redact)


@dataclass(frozen=True)
class InputConfig:
    uri: str | tuple[str, ...] = _option(_locations)
    format: str = _option(_choice("auto", "images", "webdataset", "parquet"), "auto")
    image_column: str = _option(_string, "image")
    exif_transpose: bool = _option(_boolean, True)  # turn images as their EXIF orientation says
    # decode JPEGs at 1/2, 1/4 or 1/8 scale where that is still at least the model's size: faster, not exact
    jpeg_draft: bool = _option(_boolean, False)
    # images whose header declares more pixels are error rows, refused before decoding (decompression bombs);
    # Pillow itself refuses more than twice its MAX_IMAGE_PIXELS (179 M)
    max_pixels: int = _option(_positive_int, DEFAULT_MAX_PIXELS)

    @property
    def uris(self) -> tuple[str, ...]:
        """`uri` as a tuple, whether one URI or a list was given."""
        return (self.uri,) if isinstance(self.uri, str) else self.uri


@dataclass(frozen=True)
class PromptsConfig:
    uri: str = _option(_location)
    classes: tuple[str, ...] = _option(_class_names)
    mask_format: str = _option(_choice("labels", "rgb"), "labels")
    embedding: str = _option(_choice("semantic", "instance"), "semantic")


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str = _option(_location)
    dtype: str = _option(_choice("auto", "float32", "bfloat16", "float16"), "auto")
    attention: str = _option(_choice("auto", "sdpa", "flex"), "auto")  # auto: flex on CUDA, sdpa on the CPU


@dataclass(frozen=True)
class OutputConfig:
    uri: str = _option(_location)
    png: bool = _option(_boolean, True)
    resume: bool = _option(_boolean, True)
    rows_per_file: int = _option(_positive_int, 256)  # rows of one labels/ Parquet file; also resume's step
    # labels in the output made by another model or prompt set: refuse to resume (exit 2), or relabel them
    on_mismatch: str = _option(_choice("refuse", "relabel"), "refuse")


@dataclass(frozen=True)
class ComputeConfig:
    batch_size: int = _option(_positive_int, 8)
    actors: tuple[int, int] = _option(_actor_range, (1, 1))
    gpus_per_actor: str | float = _option(_gpus, "auto")
    cpus_per_actor: float = _option(_number, 1.0)
    cpus_per_task: float = _option(_number, 1.0)  # each preprocess and postprocess task (decode, resize, PNG)
    # with `auto` (gpus_per_actor, dtype) on a cluster without GPUs whose autoscaler reports no GPU node types: how
    # long to wait for a GPU node to join before settling on the CPU
    gpu_wait_s: float = _option(_number, 0.0)


@dataclass(frozen=True)
class StorageConfig:
    # seconds of transient storage errors (unreachable, timeouts, 5xx, throttling) one operation rides out
    # before the image becomes an error row (reads) or the job stops with exit code 3 (everything else)
    retry_s: float = _option(_number, DEFAULT_RETRY_S)


@dataclass(frozen=True)
class JobConfig(_Dumpable):
    input: InputConfig
    prompts: PromptsConfig
    model: ModelConfig
    output: OutputConfig
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)


def _sections(config: type) -> dict[str, type]:
    """The section classes of a whole config class, by name (every field but `storage_options`)."""
    hints = get_type_hints(config)
    return {spec.name: hints[spec.name] for spec in dataclasses.fields(config) if spec.name != "storage_options"}


_SECTIONS = _sections(JobConfig)


def load_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML file (or take a dict), apply `section.key=value` overrides and validate it all."""
    return _load(source, overrides, JobConfig)


def _load(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str], config: type) -> Any:
    """The whole config of class `config`: its sections (those with a default may be left out) checked, and its
    `storage_options`."""
    sections = _sections(config)
    optional = {spec.name for spec in dataclasses.fields(config) if spec.default_factory is not dataclasses.MISSING}
    raw = _read_yaml(source) if isinstance(source, (str, os.PathLike)) else copy.deepcopy(dict(source))
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {_describe(raw)}")
    for override in overrides:
        _apply_override(raw, override, sections)
    for name in raw:
        if name not in sections and name != "storage_options":
            raise ConfigError(f"{name}: unknown section")
    checked = {name: _section(name, cls, raw.get(name), name in optional) for name, cls in sections.items()}
    storage_options = raw.get("storage_options")
    checked["storage_options"] = {} if storage_options is None else _mapping("storage_options", storage_options)
    return config(**checked)


def _read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.safe_load(file) or {}
    except OSError as error:
        raise ConfigError(f"{os.fspath(path)}: cannot read config ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML ({error})") from None


def _section(name: str, cls: type, raw: Any, optional: bool) -> Any:
    if raw is None:
        if optional:
            return cls()
        raise ConfigError(f"{name}: missing required section")
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {_describe(raw)}")
    known = {spec.name: spec for spec in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key")
    values = {}
    for key, spec in known.items():
        if key in raw:
            values[key] = spec.metadata["check"](f"{name}.{key}", raw[key])
        elif spec.default is dataclasses.MISSING:
            raise ConfigError(f"{name}.{key}: missing required key")
    return cls(**values)


def _apply_override(raw: dict[str, Any], override: str, sections: dict[str, type]) -> None:
    """Set `section.key=value` (value parsed as YAML) in the raw config; storage_options may nest."""
    dotted, sep, text = override.partition("=")
    path = dotted.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {override}: expected section.key=value")
    section, key = path[0], path[1]
    if section != "storage_options":
        if section not in sections:
            raise ConfigError(f"{section}: unknown section (in --set {override})")
        if len(path) > 2 or key not in {spec.name for spec in dataclasses.fields(sections[section])}:
            raise ConfigError(f"{dotted.strip()}: unknown key (in --set {override})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{dotted.strip()}: value is not valid YAML ({error})") from None
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: expected a mapping, got {_describe(child)}")
        node = child
    node[path[-1]] = value


def _as_dict(config: Any, redact: bool) -> dict[str, Any]:
    data = _plain(dataclasses.asdict(config))
    if redact:
        data["storage_options"] = _redact(data["storage_options"])
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "***" if any(marker in str(key).lower() for marker in _SECRET_MARKERS) else _redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact(item) for item in value]
    return value


# --- the training config (`seggpt-autolabel train`) ----------------------------------------------


@dataclass(frozen=True)
class TrainModelConfig:
    checkpoint: str | None = _option(lambda key, value: None if value is None else _location(key, value), None)  # start from it; else random weights of `config`
    config: dict[str, Any] | None = _option(_mapping, None)  # SegGptConfig fields, for random weights


@dataclass(frozen=True)
class TrainDataConfig:
    seed: int = _option(_count, 0)  # of the synthetic tasks (pipeline.synthetic) and of the colour mappings
    # labelled data instead of synthetic tasks (pipeline.labelled): its URI(s), layout and number of classes
    uri: str | tuple[str, ...] | None = _option(lambda key, value: None if value is None else _locations(key, value),
                                                None)
    format: str = _option(_choice("auto", "images", "webdataset", "parquet"), "auto")
    image_column: str = _option(_string, "image")
    mask_column: str = _option(_string, "mask")
    mask_field: str = _option(_string, "seg.png")
    num_classes: int = _option(_positive_int, 255)  # labels above it are refused


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = _option(_positive_int, 1000)
    batch_size: int = _option(_positive_int, 16)  # pairs per worker and step
    lr: float = _option(_number, 3e-4)
    weight_decay: float = _option(_number, 0.05)
    warmup_steps: int = _option(_count, 100)
    log_every: int = _option(_positive_int, 20)
    checkpoint_every: int = _option(_positive_int, 500)


@dataclass(frozen=True)
class TrainOutputConfig:
    uri: str = _option(_location)  # checkpoint-<step>/ folders that load_model reads, and train_log.jsonl


@dataclass(frozen=True)
class TrainComputeConfig:
    workers: int = _option(_positive_int, 1)
    gpus_per_worker: str | float = _option(_gpus, "auto")
    cpus_per_worker: float = _option(_number, 1.0)


@dataclass(frozen=True)
class TrainConfig(_Dumpable):
    model: TrainModelConfig
    output: TrainOutputConfig
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    compute: TrainComputeConfig = field(default_factory=TrainComputeConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)


def load_train_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config, read and checked like the job's (`load_config`)."""
    return _load(source, overrides, TrainConfig)



# --- the in-context tuning config (`seggpt-autolabel tune`) --------------------------------------


@dataclass(frozen=True)
class TuneModelConfig:
    checkpoint: str = _option(_location)  # the model, frozen


@dataclass(frozen=True)
class TunePromptConfig:
    uri: str = _option(_location)  # a prompt folder, manifest or tuned prompt file, as prompts.uri takes
    classes: tuple[str, ...] = _option(_class_names)
    # which prompt of it to start from; default: the first
    name: str | None = _option(lambda key, value: None if value is None else _string(key, value), None)
    mask_format: str = _option(_choice("labels", "rgb"), "labels")
    embedding: str = _option(_choice("semantic", "instance"), "semantic")


@dataclass(frozen=True)
class TuneDataConfig:
    uri: str | tuple[str, ...] = _option(_locations)  # the labelled pool (pipeline.labelled)
    format: str = _option(_choice("auto", "images", "webdataset", "parquet"), "auto")
    image_column: str = _option(_string, "image")
    mask_column: str = _option(_string, "mask")
    mask_field: str = _option(_string, "seg.png")
    val_fraction: float = _option(_number, 0.25)  # of the pool, by key: the same split as select-prompts'
    seed: int = _option(_count, 0)


@dataclass(frozen=True)
class TuneLoopConfig:
    steps: int = _option(_positive_int, 200)
    batch_size: int = _option(_positive_int, 8)  # target images per worker and step
    lr: float = _option(_number, 0.01)  # Adam, on the prompt's normalised pixels
    log_every: int = _option(_positive_int, 10)
    checkpoint_every: int = _option(_positive_int, 50)


@dataclass(frozen=True)
class TuneConfig(_Dumpable):
    model: TuneModelConfig
    prompt: TunePromptConfig
    data: TuneDataConfig
    output: TrainOutputConfig
    train: TuneLoopConfig = field(default_factory=TuneLoopConfig)
    compute: TrainComputeConfig = field(default_factory=TrainComputeConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)


_TUNE_SECTIONS = _sections(TuneConfig)


def load_tune_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> TuneConfig:
    """The tuning config, read and checked like the job's (`load_config`)."""
    return _load(source, overrides, TuneConfig)
