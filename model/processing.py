"""Pre- and post-processing for SegGPT, equal to the Hugging Face reference.

CPU side (uint8): decode-time image/mask preparation, class-map upsampling, PNG encoding.
Device side (torch): normalisation and the nearest-palette-colour class assignment.

Colour conventions follow the SegGPT paper and `transformers`: a class map is painted with
`build_palette(num_labels)` (class 0 is black) and the model paints its prediction the same way.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LABEL_MODES = ("L", "P", "1") + _SIXTEEN_BIT_MODES


# ----------------------------------------------------------------------------- palette


def build_palette(num_labels: int) -> np.ndarray:
    """Class colours, uint8 (num_labels + 1, 3); class 0 is black.

    Class i >= 1 gets digits (r, g, b) of i - 1 in base `base` and colour 255 - digit * (256 // base).
    `base` is computed as int(num_labels ** (1/3)) + 1 in floating point, like the reference: for a
    perfect cube (64, 125, ...) the float cube root falls just short, so base is one less than the
    exact rule would give. That is kept on purpose: the colours must be the reference's.
    """
    if num_labels < 0:
        raise ValueError(f"num_labels must be >= 0, got {num_labels}")
    base = int(num_labels ** (1 / 3)) + 1
    margin = 256 // base
    i = np.arange(num_labels)
    digits = np.stack([i // base**2, (i % base**2) // base, i % base], axis=1)
    colours = 255 - digits * margin
    return np.concatenate([np.zeros((1, 3), np.int64), colours]).astype(np.uint8)


# ----------------------------------------------------------------------------- CPU: inputs


def prepare_image(
    image: Image.Image | np.ndarray,
    size: tuple[int, int],
    *,
    exif_transpose: bool = True,
    name: str = "image",
) -> np.ndarray:
    """Any supported image -> uint8 (height, width, 3) RGB at `size` = (height, width), BICUBIC.

    Conversion to RGB before resizing:
      RGB: as is. RGBA, LA, PA, RGBX: alpha dropped (the colour channels as stored, not
      composited). L, 1 (0/255): grey replicated to 3 channels. P: through its palette. CMYK, YCbCr,
      LAB, HSV: Pillow's conversion. I;16*, I: clipped to 0..65535 and scaled to 8 bit by
      round(v * 255 / 65535). F: assumed in [0, 1], clipped and scaled by 255 (rounded).
      uint8 arrays: (H, W) grey, (H, W, 3) RGB, (H, W, 4) RGBA with alpha dropped.
    With `exif_transpose`, a PIL image's EXIF orientation is applied first, so the result (and the
    labels made from it) line up with what a viewer shows.
    """
    if isinstance(image, Image.Image):
        if exif_transpose and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    rgb = _to_rgb(image, name)
    return _resize(rgb, size, Image.Resampling.BICUBIC, name)


def prepare_mask(
    mask: Image.Image | np.ndarray,
    size: tuple[int, int],
    *,
    mask_format: Literal["labels", "rgb"],
    num_labels: int | None = None,
    image_size: tuple[int, int] | None = None,
    name: str = "mask",
) -> np.ndarray:
    """A prompt mask -> uint8 (height, width, 3) colour mask at `size`, NEAREST resize.

    mask_format="labels": a single-channel integer label map (PIL L, P (the indices), 1, I, I;16, or
    an integer/bool array (H, W)) with values 0..num_labels, painted with `build_palette(num_labels)`;
    with num_labels None the value (0..255) is replicated to 3 channels, as the reference does.
    mask_format="rgb": a colour mask used as given (converted to RGB like `prepare_image`, without
    EXIF handling). `image_size` = (height, width) of the prompt image; a mask of another size is an
    error. Masks are taken as stored (no EXIF orientation).
    """
    if mask_format == "labels":
        labels = _label_array(mask, name)
        _check_size(labels, image_size, name)
        rgb = _paint(labels, num_labels, name)
    elif mask_format == "rgb":
        rgb = _to_rgb(mask, name)
        _check_size(rgb, image_size, name)
    else:
        raise ValueError(f"{name}: mask_format must be 'labels' or 'rgb', got {mask_format!r}")
    return _resize(rgb, size, Image.Resampling.NEAREST, name)


def _to_rgb(image: Image.Image | np.ndarray, name: str) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image or a uint8 array (see `prepare_image` for the rules)."""
    if isinstance(image, Image.Image):
        image = _pil_to_array(image, name)
    elif not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 array, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[:, :, :3]
    elif image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    else:
        raise ValueError(f"{name}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    _check_nonempty(image, name)
    return np.ascontiguousarray(image)


def _pil_to_array(image: Image.Image, name: str) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) from a PIL image of any mode."""
    if image.mode in ("RGB", "L"):
        return np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if image.mode == "F":
        return np.rint(np.clip(np.asarray(image), 0.0, 1.0) * 255).astype(np.uint8)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: cannot convert PIL mode {image.mode} to RGB: {e}") from e


def _label_array(mask: Image.Image | np.ndarray, name: str) -> np.ndarray:
    """Integer (H, W) label map from a single-channel PIL image or an integer array."""
    if isinstance(mask, Image.Image):
        if mask.mode not in _LABEL_MODES:
            raise ValueError(
                f"{name}: a label mask must be single-channel (L, P, 1, I, I;16), got mode {mask.mode}; "
                "use mask_format='rgb' for colour masks"
            )
        mask = np.asarray(mask)
    elif not isinstance(mask, np.ndarray):
        raise ValueError(f"{name}: expected a PIL image or a numpy array, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"{name}: a label mask must have shape (H, W), got {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        raise ValueError(f"{name}: a label mask must hold integers, got dtype {mask.dtype}")
    _check_nonempty(mask, name)
    return mask


def _paint(labels: np.ndarray, num_labels: int | None, name: str) -> np.ndarray:
    """Label map -> uint8 (H, W, 3): palette colours, or the grey value when num_labels is None."""
    low, high = int(labels.min()), int(labels.max())
    limit = 255 if num_labels is None else num_labels
    if low < 0 or high > limit:
        bad = low if low < 0 else high
        what = "grey value without num_labels" if num_labels is None else f"num_labels={num_labels}"
        raise ValueError(f"{name}: label {bad} is outside 0..{limit} ({what})")
    if num_labels is None:
        return np.repeat(labels.astype(np.uint8)[:, :, None], 3, axis=2)
    return build_palette(num_labels)[labels.astype(np.intp)]


def _check_nonempty(array: np.ndarray, name: str) -> None:
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: empty image of size {array.shape[1]}x{array.shape[0]} (width x height)")


def _check_size(mask: np.ndarray, image_size: tuple[int, int] | None, name: str) -> None:
    if image_size is not None and tuple(mask.shape[:2]) != tuple(image_size):
        raise ValueError(
            f"{name}: mask is {mask.shape[0]}x{mask.shape[1]} (height x width) but its image is "
            f"{image_size[0]}x{image_size[1]}"
        )


def _resize(rgb: np.ndarray, size: tuple[int, int], resample: Image.Resampling, name: str) -> np.ndarray:
    """PIL resize of a uint8 (H, W, 3) array to `size` = (height, width)."""
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"{name}: target size must be positive, got {size}")
    return np.array(Image.fromarray(rgb).resize((width, height), resample))


# ----------------------------------------------------------------------------- device


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W): (x / 255 - mean) / std, computed in float32, cast to `dtype`.

    Matches the reference's rescale (float64 multiply, rounded to float32) then float32 normalise:
    x / 255 correctly rounded in float32 is the same number.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    mean, std = _stats(images.device)
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    x = x.div_(255).sub_(mean).div_(std)
    return x.to(dtype)


def masks_to_class_ids(pred_masks: torch.Tensor, palette: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input half of the prediction, (B, 3, h, w) normalised -> (class ids, confidence), both (B, h, w).

    Colours are denormalised and clipped to 0..255 like the reference. With a palette (K, 3), the id is
    the nearest colour by squared distance (first one on ties); dtype uint8 for K <= 256, else int16
    or int32. Confidence = (r2 - r1) / (r2 + r1), r1 and r2 the distances to the nearest and
    second-nearest colour: 1 on a palette colour, 0 halfway between two (1 when K == 1).
    Without a palette the id is the reference's grey value int(mean over channels), uint8, and the
    confidence is |v - 127.5| / 127.5 for that mean v: 1 at black or white, 0 at mid-grey.
    """
    colours = _denormalize(pred_masks.float())
    if palette is None:
        grey = colours.mean(dim=1)
        return grey.int().to(torch.uint8), (grey - 127.5).abs_().div_(127.5)
    pal = palette.to(device=colours.device, dtype=torch.float32)
    ids, d1, d2 = _nearest_two(colours, pal)
    r1, r2 = d1.sqrt_(), d2.sqrt_()
    confidence = 1 - 2 * r1 / (r1 + r2).clamp_min_(torch.finfo(torch.float32).tiny)
    return ids.to(_id_dtype(len(pal))), confidence


def class_scores(ids: torch.Tensor, confidence: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, h, w) class ids and confidences (`masks_to_class_ids`) -> (B, num_classes) float32: each class's mean
    confidence over its pixels, NaN for a class with none. Computed where the tensors are (on the device)."""
    batch = ids.shape[0]
    index = ids.reshape(batch, -1).long()
    sums = torch.zeros(batch, num_classes, device=ids.device).scatter_add_(
        1, index, confidence.reshape(batch, -1).float()
    )
    counts = torch.zeros_like(sums).scatter_add_(1, index, torch.ones_like(sums[:, :1]).expand_as(index))
    return sums / counts  # 0 / 0: NaN


def _denormalize(masks: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, h, w) -> colours in 0..255, with the reference's operations in its order."""
    mean, std = _stats(masks.device)
    return torch.clip((masks * std + mean) * 255, 0, 255)


def _nearest_two(
    colours: torch.Tensor, palette: torch.Tensor, max_elements: int = 2**26
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmin over palette entries of the squared distance, plus the smallest two distances.

    The palette is walked in chunks so that the distance tensor stays under `max_elements`; a later
    chunk only wins when strictly closer, which keeps torch.argmin's first-index tie rule.
    """
    batch, _, h, w = colours.shape
    step = max(2, max_elements // (batch * h * w))
    ids = d1 = d2 = None
    for start in range(0, len(palette), step):
        dist = _squared_distance(colours, palette[start : start + step])
        c_ids = dist.argmin(dim=1) + start
        if dist.shape[1] >= 2:
            c_d1, c_d2 = dist.topk(2, dim=1, largest=False).values.unbind(1)
        else:
            c_d1, c_d2 = dist[:, 0], torch.full_like(dist[:, 0], float("inf"))
        if ids is None:
            ids, d1, d2 = c_ids, c_d1, c_d2
            continue
        closer = c_d1 < d1
        d2 = torch.minimum(torch.maximum(d1, c_d1), torch.minimum(d2, c_d2))
        ids = torch.where(closer, c_ids, ids)
        d1 = torch.minimum(d1, c_d1)
    return ids, d1, d2


def _squared_distance(colours: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) and (k, 3) -> (B, k, h, w); channels summed in order, as the reference does."""
    dist = (colours[:, None, 0] - palette[:, 0, None, None]).square_()
    dist += (colours[:, None, 1] - palette[:, 1, None, None]).square_()
    dist += (colours[:, None, 2] - palette[:, 2, None, None]).square_()
    return dist


def _id_dtype(num_classes: int) -> torch.dtype:
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 2**15 else torch.int32


# ----------------------------------------------------------------------------- CPU: outputs


def upsample_class_map(class_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w) map to `size` = (height, width), dtype kept.

    Same pixels as torch's F.interpolate(mode="nearest") on a float32 (or uint8/half) tensor: source
    index = min(floor(dst * (in / out)), in - 1), all in float32 (torch uses float64 for float64 input).
    """
    if class_map.ndim != 2:
        raise ValueError(f"class_map must be 2-D, got shape {class_map.shape}")
    rows = _nearest_index(class_map.shape[0], size[0])
    cols = _nearest_index(class_map.shape[1], size[1])
    return class_map[:, cols][rows]


def upsampled_class_counts(class_map: np.ndarray, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Pixels of each class in `upsample_class_map(class_map, size)`, (num_classes,) int64, without upsampling.

    Each source pixel stands for (output rows mapped to its row) x (output columns mapped to its column) pixels,
    so the counts come from the small map: at 12 MP that is 60 times fewer pixels to count.
    """
    rows = np.bincount(_nearest_index(class_map.shape[0], size[0]), minlength=class_map.shape[0])
    cols = np.bincount(_nearest_index(class_map.shape[1], size[1]), minlength=class_map.shape[1])
    weights = np.outer(rows, cols).ravel()
    return np.bincount(class_map.ravel(), weights=weights, minlength=num_classes).astype(np.int64)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out).astype(np.float32) * scale).astype(np.intp)
    return np.minimum(index, n_in - 1)


def encode_png(class_map: np.ndarray, palette: np.ndarray | None) -> bytes:
    """Class map -> PNG bytes, lossless.

    Up to 256 palette entries: an indexed (P) PNG whose palette is the class colours. More: a 16-bit
    greyscale PNG of the ids. palette None (grey maps without classes): an 8-bit greyscale PNG.
    """
    if class_map.ndim != 2 or not np.issubdtype(class_map.dtype, np.integer):
        raise ValueError(f"class_map must be a 2-D integer array, got {class_map.dtype} {class_map.shape}")
    limit = 255 if palette is None else min(len(palette), 65536) - 1
    if class_map.size and (class_map.min() < 0 or class_map.max() > limit):
        raise ValueError(f"class ids must be in 0..{limit}, got {class_map.min()}..{class_map.max()}")
    if palette is not None and len(palette) > 256:
        image = Image.fromarray(class_map.astype(np.uint16))
    else:
        image = Image.fromarray(class_map.astype(np.uint8))
        if palette is not None:
            image.putpalette(np.asarray(palette, dtype=np.uint8).tobytes())  # L -> P
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes from `encode_png` -> class map: uint8 for indexed/8-bit, uint16 for 16-bit."""
    image = Image.open(io.BytesIO(data))
    if image.mode in ("P", "L"):
        return np.asarray(image).copy()
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)
    raise ValueError(f"not a class-map PNG: mode {image.mode}")
