"""The prompt set: example images with class masks, read and checked once on the driver.

Layouts of `prompts.uri`:
- a folder (local or any fsspec URL): each prompt is an image `NAME.<jpg|jpeg|png|webp|bmp|tif|tiff>` and its mask
  `NAME.png`; when the image itself is a PNG, name the mask `NAME.mask.png`;
- a manifest `.json`/`.yaml`/`.yml`: a list of `{image: PATH, mask: PATH}`, paths relative to the manifest.
Masks are label maps (`mask_format: labels`, pixel value = class id, 0 = background) or colour masks painted with
the class palette (`mask_format: rgb`).
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
import yaml
from PIL import Image, ImageOps

from model.processing import build_palette, prepare_image, prepare_mask

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_MANIFEST_EXTENSIONS = (".json", ".yaml", ".yml")


class PromptSetError(ValueError):
    """A prompt set the job refuses to start with; the message names the file."""


@dataclass(frozen=True)
class PromptSet:
    names: tuple[str, ...]
    images: np.ndarray  # uint8 (K, H, W, 3) at the model's input size
    masks: np.ndarray  # uint8 (K, H, W, 3) painted with `palette`
    classes: tuple[str, ...]  # names of class ids 1..N
    palette: np.ndarray  # uint8 (N + 1, 3); class 0 (background) is black
    embedding: str  # "semantic" or "instance"
    fingerprint: str  # sha256 of the files, classes and options


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
        raise PromptSetError(f"prompts.uri {uri}: no such folder or manifest")
    pairs = _manifest_pairs(fs, path, uri) if path.endswith(_MANIFEST_EXTENSIONS) else _folder_pairs(fs, path, uri)
    if not pairs:
        raise PromptSetError(f"prompts.uri {uri}: no prompts (an image NAME.jpg with its mask NAME.png)")
    palette = build_palette(len(classes))
    digest = hashlib.sha256(json.dumps([classes, mask_format, embedding]).encode())
    names, images, masks = [], [], []
    for name, image_path, mask_path in pairs:
        image_bytes, mask_bytes = _read(fs, image_path), _read(fs, mask_path)
        digest.update(hashlib.sha256(image_bytes).digest() + hashlib.sha256(mask_bytes).digest())
        image = _open(image_bytes, image_path)
        image = ImageOps.exif_transpose(image)
        mask = _open(mask_bytes, mask_path)
        mask = np.asarray(mask.convert("RGB")) if mask_format == "rgb" else mask
        try:
            images.append(prepare_image(image, size, exif_transpose=False, name=image_path))
            if mask_format == "rgb":
                mask = _rgb_to_labels(mask, palette, mask_path)
            masks.append(
                prepare_mask(mask, size, mask_format="labels", num_labels=len(classes),
                             image_size=(image.height, image.width), name=mask_path)
            )
        except ValueError as error:
            raise PromptSetError(str(error)) from error
        names.append(name)
    return PromptSet(
        names=tuple(names),
        images=np.stack(images),
        masks=np.stack(masks),
        classes=tuple(classes),
        palette=palette,
        embedding=embedding,
        fingerprint=digest.hexdigest()[:16],
    )


def _folder_pairs(fs: fsspec.AbstractFileSystem, folder: str, uri: str) -> list[tuple[str, str, str]]:
    files = sorted(p for p in fs.find(folder) if p.lower().endswith(_IMAGE_EXTENSIONS))
    try:
        return [(stem, image, mask) for stem, image, mask in image_mask_pairs(files, folder)]
    except ValueError as error:
        raise PromptSetError(f"prompts.uri {uri}: {error}") from None


def image_mask_pairs(paths: list[str], folder: str) -> list[tuple[str, str, str]]:
    """(stem relative to `folder`, image path, mask path) for image files `NAME.<ext>` with their masks `NAME.png`
    (`NAME.mask.png` when the image is a PNG); ValueError naming a stem without exactly one image and one mask."""
    by_stem: dict[str, list[str]] = {}
    for path in paths:
        stem, _ = posixpath.splitext(posixpath.relpath(path, folder))
        by_stem.setdefault(stem, []).append(path)
    pairs = []
    for stem, group in sorted(by_stem.items()):
        if stem.endswith(".mask") and stem.removesuffix(".mask") in by_stem:
            continue
        if f"{stem}.mask" in by_stem:
            mask, images = by_stem[f"{stem}.mask"][0], group
        else:
            mask = next((p for p in group if p.lower().endswith(".png")), None)
            images = [p for p in group if p != mask]
        if mask is None or len(images) != 1:
            found = ", ".join(posixpath.basename(p) for p in group)
            raise ValueError(f"{stem!r} needs one image and one PNG mask, found {found}")
        pairs.append((stem, images[0], mask))
    return pairs


def _manifest_pairs(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[tuple[str, str, str]]:
    try:
        entries = yaml.safe_load(_read(fs, path))
    except yaml.YAMLError as error:
        raise PromptSetError(f"{uri}: not a YAML/JSON manifest: {error}") from error
    if not isinstance(entries, list):
        raise PromptSetError(f"{uri}: expected a list of {{image, mask}} entries")
    folder = posixpath.dirname(path)
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"image", "mask"}:
            raise PromptSetError(f"{uri}: entry {i} must have exactly the keys 'image' and 'mask', got {entry!r}")
        image, mask = (posixpath.normpath(posixpath.join(folder, str(entry[k]))) for k in ("image", "mask"))
        pairs.append((posixpath.splitext(str(entry["image"]))[0], image, mask))
    return pairs


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
