"""Load SegGPT weights: a Hugging Face model folder or an original BAAI checkpoint, from any fsspec URL, or a
Hugging Face model id (`BAAI/seggpt-vit-large`, as in transformers) through this node's hub cache.

Our parameter names are the authors' (`seggpt_vit_large.pth`); Hugging Face names are renamed on load.
Pickled files are read with `weights_only=True`: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import posixpath
import re
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors

from model.config import SegGptConfig
from model.seggpt import SegGpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hugging Face name (after an optional "model." prefix) -> ours.
_HF_RENAMES = [
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.mask_token$", "mask_token"),
    (r"embeddings\.segment_token_input$", "segment_token_x"),
    (r"embeddings\.segment_token_prompt$", "segment_token_y"),
    (r"embeddings\.type_token_semantic$", "type_token_cls"),
    (r"embeddings\.type_token_instance$", "type_token_ins"),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"encoder\.layers\.(\d+)\.attention\.", r"blocks.\1.attn."),
    (r"encoder\.layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.mlp\.lin1\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.(\d+)\.mlp\.lin2\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layernorm\.", "norm."),
    (r"decoder\.decoder_embed\.", "decoder_embed."),
    (r"decoder\.decoder_pred\.conv\.", "decoder_pred.0."),
    (r"decoder\.decoder_pred\.layernorm\.", "decoder_pred.1."),
    (r"decoder\.decoder_pred\.head\.", "decoder_pred.3."),
]
_HF_MARKERS = ("embeddings.", "encoder.layers.", "decoder.decoder_")


_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")  # org/name[@revision]
_HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.pth"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the config."""


def is_hub_id(uri: str) -> bool:
    """Whether `uri` names a Hugging Face model (`org/name`, optionally `@revision`) rather than a path or URL: it
    looks like one, and no such path exists here."""
    return "://" not in uri and _HUB_ID.match(uri) is not None and not os.path.exists(uri)


def resolve_checkpoint(uri: str) -> str:
    """`uri` itself, or for a Hugging Face model id (`is_hub_id`) the folder of its snapshot in this node's hub cache,
    downloaded the first time (huggingface_hub locks the cache, so that the processes of a node share one download).
    Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE; raises `CheckpointError` in one line when the id is neither
    cached nor reachable."""
    if not is_hub_id(uri):
        return uri
    from huggingface_hub import snapshot_download

    match = _HUB_ID.match(uri)
    try:
        return snapshot_download(match["repo"], revision=match["revision"], allow_patterns=_HUB_FILES)
    except Exception as error:  # huggingface_hub's errors: offline and not cached, no such repo, no network, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{uri}: a Hugging Face model id, not in the hub cache or not reachable: {reason}"
        ) from None


def hf_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `SegGptForImageSegmentation` (or `SegGptModel`) state dict to our names.

    Keys that match no rule are kept as they are, so that a strict load reports them as unexpected.
    """
    renamed = {}
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        for pattern, replacement in _HF_RENAMES:
            name, count = re.subn(f"^{pattern}", replacement, name)
            if count:
                break
        else:
            name = key
        renamed[name] = value
    return renamed


def load_model(
    uri: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SegGpt:
    """Load a SegGPT model in eval mode from a local path or fsspec URL (`s3://`, `gs://`, `hf://`, ...), or a
    Hugging Face model id (`resolve_checkpoint`).

    `uri` is either a Hugging Face model folder (`config.json` + `model.safetensors` or `pytorch_model.bin`)
    or a checkpoint file (the authors' `seggpt_vit_large.pth`, a `.bin` or a `.safetensors`); a file takes its
    config from a `config.json` beside it, or else ViT-L defaults.
    """
    dtype = _resolve_dtype(dtype)
    model, state_dict = _read_checkpoint(uri, storage_options, header_only=False)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device=device or "cpu", dtype=dtype).eval()


def check_checkpoint(uri: str, *, storage_options: dict[str, Any] | None = None) -> SegGptConfig:
    """Check that the weights at `uri` fit its config, by name and shape; returns the config.

    Safetensors files are checked from their headers alone; pickled files have to be read whole.
    """
    model, _ = _read_checkpoint(uri, storage_options, header_only=True)
    return model.config


def _read_checkpoint(
    uri: str, storage_options: dict[str, Any] | None, header_only: bool
) -> tuple[SegGpt, dict[str, torch.Tensor]]:
    """A model on the meta device and the checked state dict (meta tensors with `header_only`)."""
    fs, path = fsspec.core.url_to_fs(resolve_checkpoint(uri), **(storage_options or {}))
    config = _read_config(fs, path, uri)
    if fs.isdir(path):
        state_dict = _read_folder(fs, path, uri, header_only)
    else:
        state_dict = _read_file(fs, path, uri, header_only)
    if any(key.removeprefix("model.").startswith(_HF_MARKERS) for key in state_dict):
        state_dict = hf_to_native(state_dict)
    with torch.device("meta"):
        model = SegGpt(config)
    _check_state_dict(model, state_dict, uri)
    return model, state_dict


def _read_config(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> SegGptConfig:
    if not fs.exists(path):
        raise CheckpointError(f"{uri}: no such checkpoint file or folder")
    folder = path if fs.isdir(path) else posixpath.dirname(path)
    config_path = posixpath.join(folder, "config.json")
    if not fs.exists(config_path):
        if fs.isdir(path):
            raise CheckpointError(f"{uri}: a model folder needs a config.json")
        return SegGptConfig()
    with fs.open(config_path, "r") as f:
        try:
            return SegGptConfig.from_dict(json.load(f))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{uri}: bad config.json: {error}") from error


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    return dtype


def _read_folder(fs: fsspec.AbstractFileSystem, folder: str, uri: str, header_only: bool) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if fs.exists(posixpath.join(folder, name)):
            return _read_file(fs, posixpath.join(folder, name), uri, header_only)
    index_path = posixpath.join(folder, "model.safetensors.index.json")
    if fs.exists(index_path):
        with fs.open(index_path, "r") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [shard for shard in shards if not fs.exists(posixpath.join(folder, shard))]
        if missing:
            raise CheckpointError(
                f"{uri}: model.safetensors.index.json names shards that are not there: " + ", ".join(missing)
            )
        return {
            key: value
            for shard in shards
            for key, value in _read_file(fs, posixpath.join(folder, shard), uri, header_only).items()
        }
    raise CheckpointError(f"{uri}: found no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_file(fs: fsspec.AbstractFileSystem, path: str, uri: str, header_only: bool) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors") and header_only:
        return _safetensors_shapes(fs, path, uri)
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".safetensors"):
        return load_safetensors(data)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the authors' files may carry `args`
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{uri}: refused to unpickle {path} (only plain tensors are loaded): {error}") from error
    except Exception as error:
        raise CheckpointError(f"{uri}: cannot read {path} as a PyTorch checkpoint: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{uri}: {path} holds no state dict of tensors")
    return loaded


def _safetensors_shapes(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes a safetensors header declares; no tensor data is read."""
    try:
        with fs.open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        return {k: torch.empty(v["shape"], device="meta") for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{uri}: {path} is not a safetensors file: {error}") from error


def _check_state_dict(model: SegGpt, state_dict: dict[str, torch.Tensor], uri: str) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped weight."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {expected[k]}"
        for k in expected.keys() & state_dict.keys()
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = [
        f"{title} ({len(keys)}): " + ", ".join(keys)
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{uri}: checkpoint does not match the config; " + "; ".join(problems))
