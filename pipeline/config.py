"""What the configs (the job's, training's, tuning's) share: reading them, value types and the shared sections.

`load` reads a YAML file (or takes an already-parsed dict), applies `--set section.key=value` overrides and
validates it with the pydantic model of the whole config. Every problem is a `ConfigError` whose message starts with
the dotted key, e.g. ``compute.batch_size: expected int, got 'x'`` or ``input.fromat: unknown key``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union

import fsspec
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, NonNegativeFloat, Strict, Tag
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from pipeline.storage.retry import DEFAULT_RETRY_S

_SECRET_MARKERS = ("secret", "token", "key", "password", "credential", "connection_string")

ConfigSource = Union[str, os.PathLike, Mapping[str, Any]]


class ConfigError(ValueError):
    """A bad configuration; the message names the dotted key at fault."""


def absolute_uri(uri: str) -> str:
    """A URI; a local path is made absolute here, on the driver, since Ray's workers run in folders of their own."""
    if fsspec.core.split_protocol(uri)[0] not in (None, "file", "local"):
        return uri
    return os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(uri)))


def describe(value: Any) -> str:
    """A value as an error message shows it: scalars by repr, anything else by its type's name."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    return type(value).__name__


# --- value types ------------------------------------------------------------------------------

LIST_AS_TUPLE = Strict(False)  # a tuple-typed key takes the list YAML gives (its items are still checked strictly)
Text = Annotated[str, Field(min_length=1)]
Location = Annotated[Text, AfterValidator(absolute_uri)]


def _non_empty(uris: tuple[str, ...]) -> tuple[str, ...]:
    if not uris:
        raise ValueError("expected a string or a non-empty list of strings, got []")
    return uris


Locations = Annotated[  # one URI, or a list of them (kept as a tuple)
    Union[Annotated[Location, Tag("one")],
          Annotated[tuple[Location, ...], LIST_AS_TUPLE, AfterValidator(_non_empty), Tag("many")]],
    Discriminator(lambda value: "many" if isinstance(value, (list, tuple)) else "one"),
]
Gpus = Annotated[  # `auto` is kept as given and resolved against the cluster the job runs on
    Union[Annotated[Literal["auto"], Tag("auto")], Annotated[NonNegativeFloat, Tag("number")]],
    Discriminator(lambda value: "auto" if value == "auto" else "number"),
]
Format = Literal["auto", "images", "webdataset", "parquet"]


# --- sections ---------------------------------------------------------------------------------


class Section(BaseModel):
    """A config section: unknown keys are refused, values are not coerced ('1' is no number), nothing changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Config(Section):
    """A whole config (job, training or tuning): its sections and the fsspec `storage_options`."""

    storage_options: dict[str, Any] = {}

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The config as plain YAML/JSON-ready data; with `redact`, secrets in storage_options are '***'."""
        data = _plain(self.model_dump())
        if redact:
            data["storage_options"] = _redact(data["storage_options"])
        return data


class ModelConfig(Section):
    checkpoint: Location


class StorageConfig(Section):
    # seconds of transient storage errors (unreachable, timeouts, 5xx, throttling) one operation rides out
    # before the image becomes an error row (reads) or the job stops with exit code 3 (everything else)
    retry_s: NonNegativeFloat = DEFAULT_RETRY_S


# --- loading ----------------------------------------------------------------------------------

AnyConfig = TypeVar("AnyConfig", bound=Config)


def load(source: ConfigSource, overrides: Sequence[str], config: type[AnyConfig]) -> AnyConfig:
    """Read a YAML file (or take a dict), apply `section.key=value` overrides and validate it as `config`; a
    section that is null counts as left out."""
    raw = _read_yaml(source) if isinstance(source, (str, os.PathLike)) else copy.deepcopy(dict(source))
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {describe(raw)}")
    for override in overrides:
        _apply_override(raw, override, config)
    try:
        return config.model_validate({name: value for name, value in raw.items()
                                      if value is not None or name not in config.model_fields})
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
    path = dotted.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {override}: expected section.key=value")
    section, key = path[0], path[1]
    if section != "storage_options":
        if section not in config.model_fields:
            raise ConfigError(f"{section}: unknown section (in --set {override})")
        if len(path) > 2 or key not in config.model_fields[section].annotation.model_fields:
            raise ConfigError(f"{dotted.strip()}: unknown key (in --set {override})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{dotted.strip()}: value is not valid YAML ({error})") from None
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: expected a mapping, got {describe(child)}")
        node = child
    node[path[-1]] = value


def _dotted_key(loc: tuple[int | str, ...]) -> str:
    """`section.key[index]...`: configs are two levels deep, so a name past section.key is a union member's tag."""
    names = [part for part in loc if isinstance(part, str)][:2]
    return ".".join(names) + "".join(f"[{part}]" for part in loc if isinstance(part, int))


_EXPECTED = {"int_type": "int", "float_type": "a number", "bool_type": "true or false", "dict_type": "a mapping",
             "model_type": "a mapping", "string_type": "a non-empty string", "string_too_short": "a non-empty string"}


def _message(error: ErrorDetails) -> str:
    """What is wrong, after the key: in the words of the configs' docs rather than pydantic's."""
    kind, context, got = error["type"], error.get("ctx", {}), describe(error["input"])
    if kind == "value_error":  # a check of our own (a validator), which says it all
        return str(context["error"])
    if kind in ("missing", "extra_forbidden"):
        what = "section" if len(error["loc"]) == 1 else "key"
        return f"missing required {what}" if kind == "missing" else f"unknown {what}"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", context["expected"])  # pydantic's "'a', 'b' or 'c'"
        return f"expected one of {' | '.join(options)}, got {got}"
    if kind in ("greater_than", "greater_than_equal"):
        bound = context.get("gt", context.get("ge"))
        sign = ">" if kind == "greater_than" else ">="
        return f"expected {'a number' if isinstance(bound, float) else 'an int'} {sign} {bound:g}, got {got}"
    return f"expected {_EXPECTED[kind]}, got {got}" if kind in _EXPECTED else error["msg"]


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
