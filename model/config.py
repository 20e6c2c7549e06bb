"""SegGPT configuration: the fields and defaults of the Hugging Face `SegGptConfig`, read from `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegGptConfig:
    """Architecture of a SegGPT model. Defaults are ViT-L (`BAAI/seggpt-vit-large`)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: list[int] = field(default_factory=lambda: [896, 448])  # (2 * H, W): prompt above input
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    mlp_dim: int | None = None  # None: 4 * hidden_size
    drop_path_rate: float = 0.1
    pretrain_image_size: int = 224
    decoder_hidden_size: int = 64
    use_relative_position_embeddings: bool = True
    merge_index: int = 2
    intermediate_hidden_state_indices: list[int] = field(default_factory=lambda: [5, 11, 17, 23])
    beta: float = 0.01

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), _FIELD_TYPES[f.name]))
        if isinstance(self.image_size, int):
            self.image_size = [self.image_size, self.image_size]
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.hidden_size
        self._validate()

    def _validate(self) -> None:
        if len(self.image_size) != 2:
            raise ValueError(f"image_size: expected [height, width], got {self.image_size}")
        height, width = self.image_size
        if height % (2 * self.patch_size) or width % self.patch_size:
            raise ValueError(
                f"image_size: {self.image_size} must split into two halves of whole {self.patch_size}px patches"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "relu", "gelu_new", "selu"):
            raise ValueError(f"hidden_act: unsupported activation {self.hidden_act!r}")
        if not self.intermediate_hidden_state_indices:
            raise ValueError("intermediate_hidden_state_indices: needs at least one layer index")
        if not 0 <= self.merge_index < self.num_hidden_layers:
            raise ValueError(f"merge_index: {self.merge_index} is outside 0..{self.num_hidden_layers - 1}")
        for index in self.intermediate_hidden_state_indices:
            if not self.merge_index <= index < self.num_hidden_layers:
                raise ValueError(
                    f"intermediate_hidden_state_indices: {index} must lie in merge_index..num_hidden_layers-1 "
                    f"({self.merge_index}..{self.num_hidden_layers - 1})"
                )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of the stacked prompt+input image."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def input_size(self) -> tuple[int, int]:
        """Pixel size (height, width) of one image: the input half of the stacked pair."""
        return self.image_size[0] // 2, self.image_size[1]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegGptConfig:
        """Build from a Hugging Face config dict; keys this model does not use (e.g. `hidden_dropout_prob`: it has no
        dropout) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike, **storage_options: Any) -> SegGptConfig:
        """Read a `config.json` from a local path or any fsspec URL."""
        import fsspec

        with fsspec.open(os.fspath(path), "r", **storage_options) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES = typing.get_type_hints(SegGptConfig)


def _checked(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` if it fits `annotation` (ints pass for floats, tuples for lists), else raise naming `name`."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(annotation):
            try:
                return _checked(name, value, option)
            except TypeError:
                pass
    elif annotation is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(annotation)
        if name == "image_size" and isinstance(value, int) and not isinstance(value, bool):
            return value  # a square size, widened to [size, size] by the caller
        if isinstance(value, (list, tuple)):
            return [_checked(name, v, item) for v in value]
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise TypeError(f"config key {name!r}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)
