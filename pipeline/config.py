"""What the configs (job, training, tuning) share: loading with `--set section.key=value` overrides, value types, the
shared sections. Every problem is a `ConfigError` whose message starts with the dotted key, e.g.
``compute.batch_size: expected int, got 'x'`` or ``input.fromat: unknown key``. jobs/configs/ shows every key."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import fsspec
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    Strict,
    Tag,
    ValidationError,
)
from pydantic_core import ErrorDetails

from pipeline.storage.retry import DEFAULT_RETRY_S

_SECRET_MARKERS = ("secret", "token", "key", "password", "credential", "connection_string")
ConfigSource = str | os.PathLike | Mapping[str, Any]


class ConfigError(ValueError):
    """A bad configuration; the message names the dotted key at fault."""


def absolute_uri(uri: str) -> str:
    """A URI; a local path is made absolute here, on the driver, since Ray's workers run in folders of their own."""
    if fsspec.core.split_protocol(uri)[0] not in (None, "file", "local"):
        return uri
    return os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(uri)))


def checkpoint_uri(uri: str) -> str:
    """A checkpoint's URI (`absolute_uri`), or a Hugging Face model id (`org/name[@revision]`, not a path here) as it
    is: each node resolves it in its own hub cache (`model.checkpoint.resolve_checkpoint`)."""
    from model.checkpoint import is_hub_id  # here: a config is read where torch is not needed (Ray's planning tasks)

    return uri if is_hub_id(uri) else absolute_uri(uri)


def describe(value: Any) -> str:
    """A value as error messages show it: a scalar by its repr, anything else by its type's name."""
    return repr(value) if value is None or isinstance(value, (str, int, float, bool)) else type(value).__name__


def _non_empty(uris: tuple[str, ...]) -> tuple[str, ...]:
    if not uris:
        raise ValueError("expected a string or a non-empty list of strings, got []")
    return uris


LIST_AS_TUPLE = Strict(False)  # a tuple-typed key takes the list YAML gives (its items are still checked strictly)
Text = Annotated[str, Field(min_length=1)]
Location = Annotated[Text, AfterValidator(absolute_uri)]
Checkpoint = Annotated[Text, AfterValidator(lambda uri: checkpoint_uri(uri))]
Locations = Annotated[  # one URI, or a list of them (kept as a tuple)
    Annotated[Location, Tag("one")]
    | Annotated[tuple[Location, ...], LIST_AS_TUPLE, AfterValidator(_non_empty), Tag("many")],
    Discriminator(lambda value: "many" if isinstance(value, (list, tuple)) else "one"),
]
Gpus = Annotated[  # `auto` is kept as given: resolved later, against the cluster the job runs on
    Annotated[Literal["auto"], Tag("auto")] | Annotated[NonNegativeFloat, Tag("number")],
    Discriminator(lambda value: "auto" if value == "auto" else "number"),
]
Format = Literal["auto", "images", "webdataset", "parquet"]


class Section(BaseModel):
    """A config section: unknown keys are refused, values are not coerced ('1' is no number), nothing changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Config(Section):
    """A whole config (job, training or tuning): its sections and the fsspec `storage_options`."""

    storage_options: dict[str, Any] = {}

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The config as plain YAML/JSON-ready data; with `redact`, secrets in storage_options are '***'."""
        data = self.model_dump(mode="json")
        options = data.pop("storage_options")  # shown last, after the sections
        return {**data, "storage_options": _redact(options) if redact else options}


class ModelConfig(Section):
    checkpoint: Checkpoint


class StorageConfig(Section):
    retry_s: NonNegativeFloat = DEFAULT_RETRY_S


AnyConfig = TypeVar("AnyConfig", bound=Config)


def load(source: ConfigSource, overrides: Sequence[str], config: type[AnyConfig]) -> AnyConfig:
    """Read a YAML file (or take a dict), apply `section.key=value` overrides and validate it as `config`; a null
    section counts as left out."""
    raw = _read_yaml(source) if isinstance(source, (str, os.PathLike)) else copy.deepcopy(dict(source))
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {describe(raw)}")
    for override in overrides:
        _apply_override(raw, override, config)
    try:
        return config.model_validate(
            {name: value for name, value in raw.items() if value is not None or name not in config.model_fields}
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"{_dotted_key(first['loc'])}: {_message(first)}") from None


def _read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.safe_load(file) or {}
    except OSError as error:
        raise ConfigError(f"{os.fspath(path)}: cannot read config ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML ({error})") from None


def _apply_override(raw: dict[str, Any], override: str, config: type[Config]) -> None:
    """Set `section.key=value` (value parsed as YAML) in the raw config; storage_options may nest."""
    dotted, sep, text = override.partition("=")
    dotted = dotted.strip()
    path = dotted.split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {override}: expected section.key=value")
    if path[0] != "storage_options":
        if path[0] not in config.model_fields:
            raise ConfigError(f"{path[0]}: unknown section (in --set {override})")
        if len(path) > 2 or path[1] not in config.model_fields[path[0]].annotation.model_fields:
            raise ConfigError(f"{dotted}: unknown key (in --set {override})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{dotted}: value is not valid YAML ({error})") from None
    node = raw
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: expected a mapping, got {describe(node)}")
    node[path[-1]] = value


def _dotted_key(loc: tuple[int | str, ...]) -> str:
    """`section.key[index]...`: configs are two levels deep, so a name past section.key is a union member's tag."""
    names = [part for part in loc if isinstance(part, str)][:2]
    return ".".join(names) + "".join(f"[{part}]" for part in loc if isinstance(part, int))


_EXPECTED = {
    "int_type": "int",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "string_type": "a non-empty string",
    "string_too_short": "a non-empty string",
}


def _message(error: ErrorDetails) -> str:
    """What is wrong, after the key, in the words of the configs' docs rather than pydantic's."""
    kind, context, got = error["type"], error.get("ctx", {}), describe(error["input"])
    if kind == "value_error":  # a validator of ours, whose message says it all
        return str(context["error"])
    if kind in ("missing", "extra_forbidden"):
        what = "section" if len(error["loc"]) == 1 else "key"
        return f"missing required {what}" if kind == "missing" else f"unknown {what}"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", context["expected"])  # pydantic's "'a', 'b' or 'c'"
        return f"expected one of {' | '.join(options)}, got {got}"
    if kind in ("greater_than", "greater_than_equal"):
        bound, sign = (context["gt"], ">") if kind == "greater_than" else (context["ge"], ">=")
        return f"expected {'a number' if isinstance(bound, float) else 'an int'} {sign} {bound:g}, got {got}"
    return f"expected {_EXPECTED[kind]}, got {got}" if kind in _EXPECTED else error["msg"]


def _redact(value: Any) -> Any:
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if not isinstance(value, dict):
        return value
    return {
        key: "***" if any(marker in str(key).lower() for marker in _SECRET_MARKERS) else _redact(item)
        for key, item in value.items()
    }
