"""The prompt set: example images with class masks, read and checked once on the driver.

Layouts of `prompts.uri`:
- a folder (local or any fsspec URL): each prompt is an image `NAME.<jpg|jpeg|png|webp|bmp|tif|tiff>` and its mask
  `NAME.png`; when the image itself is a PNG, name the mask `NAME.mask.png`;
- a manifest `.json`/`.yaml`/`.yml`: a list of `{image: PATH, mask: PATH}` or `{tuned: PATH}`, paths relative to
  the manifest;
- a tuned prompt file `NAME.safetensors` (`seggpt-autolabel tune` writes it); a folder may hold such files beside
  its pairs.
Masks are label maps (`mask_format: labels`, pixel value = class id, 0 = background) or colour masks painted with
the class palette (`mask_format: rgb`).

A tuned prompt is the model's input itself: an image and a mask tensor, (3, H, W) float32, normalised, at the
model's input size, with the classes, palette and embedding it was tuned for in the file's metadata. A file that
does not fit the model or the config is refused with its name.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import yaml
from PIL import Image, ImageOps
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes

from model.processing import build_palette, normalize, prepare_image, prepare_mask
from pipeline.storage.pairs import image_mask_pairs

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_MANIFEST_EXTENSIONS = (".json", ".yaml", ".yml")
TUNED_EXTENSION = ".safetensors"
_TUNED_FORMAT = "seggpt-autolabel tuned prompt 1"


class PromptSetError(ValueError):
    """A prompt set the job refuses to start with; the message names the file."""


@dataclass(frozen=True)
class PromptSet:
    names: tuple[str, ...]  # the image-mask pairs' names, then the tuned prompts'
    images: np.ndarray  # uint8 (P, H, W, 3) at the model's input size, one per pair
    masks: np.ndarray  # uint8 (P, H, W, 3) painted with `palette`
    tuned_images: np.ndarray  # float32 (T, 3, H, W), normalised: the tuned prompts, as the model takes them
    tuned_masks: np.ndarray  # float32 (T, 3, H, W)
    classes: tuple[str, ...]  # names of class ids 1..N
    palette: np.ndarray  # uint8 (N + 1, 3); class 0 (background) is black
    embedding: str  # "semantic" or "instance"
    fingerprint: str  # sha256 of the files, classes and options

    @property
    def kinds(self) -> tuple[str, ...]:
        """ "pair" or "tuned", for each of `names`."""
        return ("pair",) * len(self.images) + ("tuned",) * len(self.tuned_images)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt images, prompt masks) as the model takes them: float32 (K, 3, H, W), normalised, in `names` order."""
        images = torch.cat([normalize(torch.from_numpy(self.images)), torch.from_numpy(self.tuned_images)])
        masks = torch.cat([normalize(torch.from_numpy(self.masks)), torch.from_numpy(self.tuned_masks)])
        return images, masks


def load_prompt_set(
    uri: str,
    *,
    classes: tuple[str, ...],
    mask_format: str,
    embedding: str,
    size: tuple[int, int],
    storage_options: dict[str, Any] | None = None,
) -> PromptSet:
    """Read, check and prepare every prompt at `size` = (height, width)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise PromptSetError(f"prompts.uri {uri}: no such folder, manifest or tuned prompt file")
    if path.endswith(TUNED_EXTENSION):
        pairs, tuned = [], [(posixpath.splitext(posixpath.basename(path))[0], path)]
    elif path.endswith(_MANIFEST_EXTENSIONS):
        pairs, tuned = _manifest_pairs(fs, path, uri)
    else:
        pairs, tuned = _folder_pairs(fs, path, uri)
    if not pairs and not tuned:
        raise PromptSetError(
            f"prompts.uri {uri}: no prompts (an image NAME.jpg with its mask NAME.png, or a tuned "
            f"NAME{TUNED_EXTENSION})"
        )
    palette = build_palette(len(classes))
    digest = hashlib.sha256(json.dumps([classes, mask_format, embedding]).encode())
    names, images, masks = [], [], []
    for name, image_path, mask_path in pairs:
        image_bytes, mask_bytes = _read(fs, image_path), _read(fs, mask_path)
        digest.update(hashlib.sha256(image_bytes).digest() + hashlib.sha256(mask_bytes).digest())
        image, mask = _prepared_pair(
            image_bytes, image_path, mask_bytes, mask_path, size=size, palette=palette, mask_format=mask_format
        )
        names.append(name)
        images.append(image)
        masks.append(mask)
    tuned_images, tuned_masks = [], []
    for name, tuned_path in tuned:
        data = _read(fs, tuned_path)
        digest.update(hashlib.sha256(data).digest())
        image, mask = read_tuned_prompt(
            data, fs.unstrip_protocol(tuned_path), classes=classes, embedding=embedding, size=size
        )
        names.append(name)
        tuned_images.append(image)
        tuned_masks.append(mask)
    return PromptSet(
        names=tuple(names),
        images=np.stack(images) if images else np.zeros((0, *size, 3), np.uint8),
        masks=np.stack(masks) if masks else np.zeros((0, *size, 3), np.uint8),
        tuned_images=np.stack(tuned_images) if tuned else np.zeros((0, 3, *size), np.float32),
        tuned_masks=np.stack(tuned_masks) if tuned else np.zeros((0, 3, *size), np.float32),
        classes=tuple(classes),
        palette=palette,
        embedding=embedding,
        fingerprint=digest.hexdigest()[:16],
    )


def _prepared_pair(
    image_bytes: bytes,
    image_path: str,
    mask_bytes: bytes,
    mask_path: str,
    *,
    size: tuple[int, int],
    palette: np.ndarray,
    mask_format: str,
) -> tuple[np.ndarray, np.ndarray]:
    """A prompt's image and its mask painted in the palette's colours, both (H, W, 3) uint8 at `size`."""
    image = ImageOps.exif_transpose(_open(image_bytes, image_path))
    mask = _open(mask_bytes, mask_path)
    try:
        if mask_format == "rgb":
            mask = _rgb_to_labels(np.asarray(mask.convert("RGB")), palette, mask_path)
        return (
            prepare_image(image, size, exif_transpose=False, name=image_path),
            prepare_mask(
                mask,
                size,
                mask_format="labels",
                num_labels=len(palette) - 1,
                image_size=(image.height, image.width),
                name=mask_path,
            ),
        )
    except ValueError as error:
        raise PromptSetError(str(error)) from error


def _folder_pairs(fs: fsspec.AbstractFileSystem, folder: str, uri: str):
    """(name, image, mask) of the folder's pairs and (name, file) of its tuned prompts."""
    files = sorted(fs.find(folder))
    tuned = [(posixpath.splitext(posixpath.relpath(p, folder))[0], p) for p in files if p.endswith(TUNED_EXTENSION)]
    try:
        pairs = image_mask_pairs([p for p in files if p.lower().endswith(_IMAGE_EXTENSIONS)], folder)
    except ValueError as error:
        raise PromptSetError(f"prompts.uri {uri}: {error}") from None
    return pairs, tuned


def _manifest_pairs(fs: fsspec.AbstractFileSystem, path: str, uri: str):
    try:
        entries = yaml.safe_load(_read(fs, path))
    except yaml.YAMLError as error:
        raise PromptSetError(f"{uri}: not a YAML/JSON manifest: {error}") from error
    if not isinstance(entries, list):
        raise PromptSetError(f"{uri}: expected a list of {{image, mask}} or {{tuned}} entries")
    folder = posixpath.dirname(path)
    pairs, tuned = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and set(entry) == {"tuned"}:
            tuned.append(
                (
                    posixpath.splitext(str(entry["tuned"]))[0],
                    posixpath.normpath(posixpath.join(folder, str(entry["tuned"]))),
                )
            )
            continue
        if not isinstance(entry, dict) or set(entry) != {"image", "mask"}:
            raise PromptSetError(
                f"{uri}: entry {i} must have exactly the keys 'image' and 'mask' (or 'tuned'), got {entry!r}"
            )
        image, mask = (posixpath.normpath(posixpath.join(folder, str(entry[k]))) for k in ("image", "mask"))
        pairs.append((posixpath.splitext(str(entry["image"]))[0], image, mask))
    return pairs, tuned


def tuned_prompt_bytes(
    image: torch.Tensor, mask: torch.Tensor, *, classes: tuple[str, ...], embedding: str, **notes: Any
) -> bytes:
    """A tuned prompt file: the (3, H, W) normalised image and mask, and what they were tuned for (+ `notes`)."""
    metadata = {
        "format": _TUNED_FORMAT,
        "classes": json.dumps(list(classes)),
        "palette": json.dumps(build_palette(len(classes)).tolist()),
        "embedding": embedding,
        **{key: json.dumps(value) for key, value in notes.items()},
    }
    tensors = {"image": image.detach().float().cpu().contiguous(), "mask": mask.detach().float().cpu().contiguous()}
    return safetensors_bytes(tensors, metadata=metadata)


def read_tuned_prompt(
    data: bytes, name: str, *, classes: tuple[str, ...], embedding: str, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The (image, mask) of a tuned prompt file, float32 (3, H, W) each, checked against the model's input `size`
    = (height, width) and the config's `classes` and `embedding`; PromptSetError naming the file otherwise."""
    try:
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors and json raise several kinds for a file that is not one
        raise PromptSetError(f"{name}: not a tuned prompt file (safetensors): {error}") from None
    if metadata.get("format") != _TUNED_FORMAT or set(tensors) != {"image", "mask"}:
        raise PromptSetError(
            f"{name}: not a tuned prompt file: expected tensors 'image' and 'mask' and format "
            f"{_TUNED_FORMAT!r}, got {sorted(tensors)} and {metadata.get('format')!r}"
        )
    tuned_classes = tuple(json.loads(metadata.get("classes", "[]")))
    if tuned_classes != tuple(classes):
        raise PromptSetError(f"{name}: tuned for classes {list(tuned_classes)}, prompts.classes is {list(classes)}")
    if json.loads(metadata.get("palette", "[]")) != build_palette(len(classes)).tolist():
        raise PromptSetError(f"{name}: its palette is not the class palette of {list(classes)}")
    if metadata.get("embedding") != embedding:
        raise PromptSetError(
            f"{name}: tuned with embedding {metadata.get('embedding')!r}, prompts.embedding is {embedding!r}"
        )
    expected = (3, *size)
    for part in ("image", "mask"):
        tensor = tensors[part]
        if tuple(tensor.shape) != expected:
            raise PromptSetError(
                f"{name}: {part} is {'x'.join(map(str, tensor.shape))}, the model takes "
                f"{'x'.join(map(str, expected))} (tune the prompt for this model)"
            )
        if not torch.isfinite(tensor).all():
            raise PromptSetError(f"{name}: {part} holds values that are not finite")
    return tensors["image"].float().numpy(), tensors["mask"].float().numpy()


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except OSError as error:
        raise PromptSetError(f"{path}: cannot read: {error}") from error


def _open(data: bytes, path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises many kinds for a bad file
        raise PromptSetError(f"{path}: not a readable image: {error}") from error
    return image


def _rgb_to_labels(mask: np.ndarray, palette: np.ndarray, path: str) -> np.ndarray:
    """A colour mask -> label map; a colour outside the class palette is an error."""
    codes = mask.astype(np.int64) @ np.array([65536, 256, 1])
    palette_codes = palette.astype(np.int64) @ np.array([65536, 256, 1])
    order = np.argsort(palette_codes)
    position = np.searchsorted(palette_codes[order], codes).clip(0, len(order) - 1)
    labels = order[position]
    unknown = palette_codes[labels] != codes
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        raise PromptSetError(
            f"{path}: colour {tuple(int(c) for c in mask[y, x])} at (x={x}, y={y}) is not a class colour; "
            f"classes 0..{len(palette) - 1} are {[tuple(int(c) for c in p) for p in palette[:8]]}"
            + ("..." if len(palette) > 8 else "")
        )
    return labels.astype(np.uint16 if len(palette) > 256 else np.uint8)
