"""Parity of model.processing with the transformers reference (SegGptImageProcessorPil)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import processing as P
from pipeline.labelling.postprocess import postprocess

ref_module = pytest.importorskip("transformers.models.seggpt.image_processing_pil_seggpt")

SIZE = (448, 448)


@pytest.fixture(scope="module")
def ref():
    return ref_module.SegGptImageProcessorPil()


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_image(height: int, width: int, mode: str, seed: int) -> Image.Image:
    """A random image in `mode` (I;16/I hold 16-bit values, F values in [0, 1])."""
    g = rng(seed)
    if mode in ("I;16", "I"):
        values = g.integers(0, 65536, (height, width))
        return Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(g.random((height, width), dtype=np.float32))
    rgba = Image.fromarray(g.integers(0, 256, (height, width, 4), dtype=np.uint8))
    return rgba if mode == "RGBA" else rgba.convert(mode)


def ours(arrays: list[np.ndarray]) -> torch.Tensor:
    return P.normalize(torch.from_numpy(np.stack(arrays)))


# ----------------------------------------------------------------------------- palette


@pytest.mark.parametrize("num_labels", [0, 1, 2, 7, 26, 27, 63, 64, 125, 200, 255, 256, 1000])
def test_palette_equals_reference(num_labels):
    expected = np.array(ref_module.build_palette(num_labels))
    palette = P.build_palette(num_labels)
    assert palette.dtype == np.uint8 and palette.shape == (num_labels + 1, 3)
    np.testing.assert_array_equal(palette, expected)
    assert len({tuple(c) for c in palette}) == num_labels + 1


# ----------------------------------------------------------------------------- preprocessing parity

IMAGE_SIZES = [(1, 1), (7, 3), (37, 51), (448, 448), (449, 447), (20, 1500), (1500, 20), (300, 400)]
PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"]  # reference takes their convert("RGB")


@pytest.mark.parametrize("size", [SIZE, (224, 320)])
def test_images_equal_reference(ref, size):
    images, ref_images = [], []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        mode = PIL_MODES[i % len(PIL_MODES)]
        image = random_image(h, w, mode, seed=i)
        images.append(P.prepare_image(image, size))
        ref_images.append(image.convert("RGB"))
    for mode in PIL_MODES:  # every mode at one odd size
        image = random_image(45, 61, mode, seed=100)
        images.append(P.prepare_image(image, size))
        ref_images.append(image.convert("RGB"))
    array = rng(7).integers(0, 256, (33, 65, 4), dtype=np.uint8)  # uint8 arrays, alpha dropped
    images += [P.prepare_image(array, size), P.prepare_image(array[:, :, 0], size)]
    ref_images += [Image.fromarray(array[:, :, :3]), Image.fromarray(array[:, :, 0]).convert("RGB")]

    expected = ref(
        images=ref_images,
        prompt_images=ref_images,
        size={"height": size[0], "width": size[1]},
        return_tensors="pt",
    )
    got = ours(images)
    assert got.shape == (len(images), 3, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected["prompt_pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_depth_modes(ref, mode):
    image = random_image(50, 70, mode, seed=3)
    grey = {"F": lambda v: np.rint(v * 255), "I": lambda v: (v * 255 + 32767) // 65535}
    grey = grey.get(mode, grey["I"])(np.asarray(image).astype(np.float64 if mode == "F" else np.int64))
    rgb = Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    expected = ref(images=rgb, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours([P.prepare_image(image, SIZE)]), expected, atol=1e-5, rtol=0)


def test_sixteen_bit_scaling():
    image = Image.fromarray(np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16))
    out = P.prepare_image(image, (1, 6))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1, 128, 255])


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    random_image(40, 60, "RGB", seed=5).save(buffer, format="JPEG", exif=exif.tobytes())
    image = Image.open(io.BytesIO(buffer.getvalue()))
    upright = image.transpose(Image.Transpose.ROTATE_270)  # still carries the tag
    as_shown = P.prepare_image(image, (30, 20))
    np.testing.assert_array_equal(as_shown, P.prepare_image(upright, (30, 20), exif_transpose=False))
    as_stored = P.prepare_image(image, (30, 20), exif_transpose=False)
    np.testing.assert_array_equal(as_stored, np.asarray(image.resize((20, 30), Image.Resampling.BICUBIC)))


MASK_SIZES = [(1, 1), (5, 9), (37, 51), (448, 448), (449, 447), (20, 1500), (1500, 20)]


@pytest.mark.parametrize("num_labels", [1, 2, 5, 26, 64, 200, None])
def test_label_masks_equal_reference(ref, num_labels):
    high = 255 if num_labels is None else num_labels
    maps = [rng(i).integers(0, high + 1, hw) for i, hw in enumerate(MASK_SIZES)]
    maps = [m.astype(np.uint8) if i % 2 else m for i, m in enumerate(maps)]  # int64 and uint8 arrays
    inputs = [Image.fromarray(m.astype(np.uint8)) if i % 3 == 0 else m for i, m in enumerate(maps)]
    got = ours(
        [
            P.prepare_mask(m, SIZE, mask_format="labels", num_labels=num_labels, image_size=hw)
            for m, hw in zip(inputs, MASK_SIZES)
        ]
    )
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    expected = ref.preprocess(prompt_masks=maps, return_tensors="pt", **kwargs)["prompt_masks"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_palette_image_labels_are_indices():
    labels = rng(0).integers(0, 4, (10, 12)).astype(np.uint8)
    indexed = Image.fromarray(labels)
    indexed.putpalette(bytes(range(256)) * 3)
    a = P.prepare_mask(indexed, (10, 12), mask_format="labels", num_labels=3)
    b = P.prepare_mask(labels, (10, 12), mask_format="labels", num_labels=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, P.build_palette(3)[labels])


def test_rgb_masks_equal_reference(ref):
    palette = P.build_palette(20)
    masks = [Image.fromarray(palette[rng(i).integers(0, 21, hw)]) for i, hw in enumerate(MASK_SIZES)]
    got = ours([P.prepare_mask(m, SIZE, mask_format="rgb") for m in masks])
    expected = ref.preprocess(prompt_masks=masks, do_convert_rgb=False, return_tensors="pt")["prompt_masks"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_normalize_dtype():
    images = torch.from_numpy(rng(1).integers(0, 256, (2, 8, 9, 3), dtype=np.uint8))
    full = P.normalize(images)
    assert full.is_contiguous() and full.shape == (2, 3, 8, 9)
    assert torch.equal(P.normalize(images, dtype=torch.bfloat16), full.to(torch.bfloat16))


# ----------------------------------------------------------------------------- postprocessing parity

TARGET_SIZES = [(448, 448), (1, 1), (3, 2000), (2000, 3), (449, 447), (97, 1333), (896, 896), (224, 300), (17, 5)]


def to_normalized(colours: torch.Tensor) -> torch.Tensor:
    """Colours (B, 3, h, w) in 0..255 -> normalised values whose denormalisation gives them back exactly."""
    mean = torch.tensor(P.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    x = (colours / 255 - mean) / std
    for _ in range(4):  # nudge by one ulp towards the target until the round trip is exact
        back = torch.clip((x * std + mean) * 255, 0, 255)
        x = torch.where(back < colours, torch.nextafter(x, torch.full_like(x, 1e9)), x)
        x = torch.where(back > colours, torch.nextafter(x, torch.full_like(x, -1e9)), x)
    return x


def pred_masks(num_labels: int | None, h: int, w: int, seed: int) -> torch.Tensor:
    """(4, 3, 2h, w): random, near palette colours, exact ties between two colours, saturated."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.from_numpy(P.build_palette(num_labels if num_labels else 1)).float()
    k = len(palette)
    random = torch.randn(1, 3, h, w, generator=g) * 1.5
    picks = torch.randint(0, k, (2, h, w), generator=g)
    near = palette[picks[0]] + torch.randint(-3, 4, (h, w, 3), generator=g)
    tie = (palette[picks[0]] + palette[picks[1]]) / 2  # equidistant where the halves are integers
    tie = torch.where(tie == tie.floor(), tie, palette[picks[0]])
    colours = torch.stack([near, tie]).clip(0, 255).permute(0, 3, 1, 2)
    saturated = torch.randn(1, 3, h, w, generator=g) * 20
    bottom = torch.cat([random, to_normalized(colours), saturated])
    top = torch.randn_like(bottom)  # the prompt half, which post-processing ignores
    return torch.cat([top, bottom], dim=2)


@pytest.mark.parametrize(
    "num_labels,hw", [(None, (448, 448)), (1, (448, 448)), (3, (448, 448)), (26, (37, 53)), (200, (64, 48))]
)
def test_class_maps_equal_reference(ref, num_labels, hw):
    h, w = hw
    pred = pred_masks(num_labels, h, w, seed=num_labels or 0)
    palette = None if num_labels is None else torch.from_numpy(P.build_palette(num_labels))
    ids, confidence = P.masks_to_class_ids(pred[:, :, h:], palette)
    assert ids.shape == confidence.shape == (4, h, w) and ids.dtype == torch.uint8
    assert confidence.min() >= 0 and confidence.max() <= 1
    outputs = SimpleNamespace(pred_masks=pred)
    targets = TARGET_SIZES if num_labels is None or num_labels < 100 else [(97, 133), (3, 2000), (17, 5)]
    for target in targets:
        expected = ref.post_process_semantic_segmentation(outputs, [target] * 4, num_labels)
        for i in range(4):
            got = P.upsample_class_map(ids[i].numpy(), target)
            assert got.dtype == np.uint8 and got.shape == target
            np.testing.assert_array_equal(got, expected[i].numpy(), err_msg=f"{target} row {i}")


def test_confidence_extremes():
    palette = torch.from_numpy(P.build_palette(3)).float()
    colours = torch.stack([palette[2], (palette[1] + palette[2]) / 2]).T.reshape(1, 3, 1, 2)
    ids, confidence = P.masks_to_class_ids(to_normalized(colours), palette)
    assert ids.tolist() == [[[2, 1]]]  # a tie goes to the lower id
    torch.testing.assert_close(confidence, torch.tensor([[[1.0, 0.0]]]), atol=1e-6, rtol=0)
    grey = torch.tensor([0.0, 127.5, 255.0]).expand(3, 3).reshape(1, 3, 1, 3)
    _, confidence = P.masks_to_class_ids(to_normalized(grey), None)
    torch.testing.assert_close(confidence, torch.tensor([[[1.0, 0.0, 1.0]]]), atol=1e-3, rtol=0)


def test_scores_of_a_hand_computed_case():
    """Confidence (r2 - r1) / (r2 + r1) per pixel, r1 and r2 the distances to the nearest and second-nearest
    colour; the image's score is their mean and each class's score the mean over its pixels."""
    palette = torch.tensor([[0.0, 0, 0], [255, 0, 0], [0, 255, 0]])  # background black, 1 red, 2 green
    pixels = torch.tensor(
        [
            [[255.0, 0, 0], [200, 0, 0], [0, 0, 0]],  # red: 1; 55 from red, 200 from black; black: 1
            [[0, 100, 0], [0, 200, 0], [0, 255, 0]],
        ]
    )  # 100 from black, 155 from green; 55 / 200; 1
    ids, confidence = P.masks_to_class_ids(to_normalized(pixels.permute(0, 2, 1)[:, :, None, :]), palette)
    assert ids.tolist() == [[[1, 1, 0]], [[0, 2, 2]]]
    expected = torch.tensor([[[1.0, 145 / 255, 1.0]], [[55 / 255, 145 / 255, 1.0]]])
    torch.testing.assert_close(confidence, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        confidence.mean(dim=(1, 2)), torch.tensor([(2 + 145 / 255) / 3, (200 / 255 + 1) / 3]), atol=1e-4, rtol=0
    )
    nan = float("nan")
    scores = P.class_scores(ids, confidence, num_classes=3)
    expected_scores = torch.tensor([[1.0, (1 + 145 / 255) / 2, nan], [55 / 255, nan, (145 / 255 + 1) / 2]])
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=0, equal_nan=True)


def test_postprocess_aligns_class_scores_with_class_ids():
    class_map = np.array(
        [
            [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 3]],
        ],
        np.uint8,
    )
    scores = np.array([[0.9, np.nan, 0.25, np.nan], [np.nan, 0.5, np.nan, 0.125], [np.nan] * 4], np.float32)
    batch = {
        "key": np.array(["a.jpg", "b.jpg", "c.jpg"]),
        "source": np.array(["s/a.jpg", "s/b.jpg", "s/c.jpg"]),
        "status": np.array(["ok", "ok", "error"]),
        "error": np.array(["", "", "bad"]),
        "width": np.array([8, 2, 0]),
        "height": np.array([8, 2, 0]),
        "shard_images": np.zeros(3, np.int64),
        "class_map": np.concatenate([class_map, np.zeros((1, 4, 4), np.uint8)]),
        "score": np.array([0.7, 0.45, np.nan], np.float32),
        "class_scores": scores,
    }
    rows = postprocess(batch, palette=P.build_palette(3), model="m", prompt_set="p").to_pylist()
    assert [(row["class_ids"], row["class_scores"]) for row in rows] == [
        ([0, 2], [pytest.approx(0.9), 0.25]),
        ([1], [0.5]),  # downscaled to 2x2: the one pixel of class 3 is gone, and so is its score
        ([], []),
    ]
    assert rows[0]["pixel_counts"] == [48, 16] and rows[1]["pixel_counts"] == [4]


def test_palette_chunks_agree():
    palette = torch.from_numpy(P.build_palette(300)).float()
    colours = torch.from_numpy(rng(2).integers(0, 256, (2, 3, 16, 16))).float()
    whole = P._nearest_two(colours, palette)
    chunked = P._nearest_two(colours, palette, max_elements=2 * 16 * 16 * 7)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    assert torch.equal(whole[0], P._squared_distance(colours, palette).argmin(dim=1))
    ids, _ = P.masks_to_class_ids(to_normalized(colours), palette)
    assert ids.dtype == torch.int16


@pytest.mark.parametrize("n_in", [1, 3, 37, 448, 449, 1000])
def test_nearest_index_equals_torch(n_in):
    for n_out in [1, 2, 5, 447, 448, 896, 897, 1333, 3001, 65537, 200003]:
        source = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)  # float32: the reference dtype
        expected = F.interpolate(source, size=n_out, mode="nearest")[0, 0].long().numpy()
        np.testing.assert_array_equal(P._nearest_index(n_in, n_out), expected, err_msg=f"{n_in}->{n_out}")


def test_upsample_keeps_dtype():
    class_map = rng(0).integers(0, 1000, (5, 7)).astype(np.int16)
    out = P.upsample_class_map(class_map, (11, 13))
    expected = F.interpolate(torch.from_numpy(class_map).float()[None, None], size=(11, 13), mode="nearest")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, expected[0, 0].numpy().astype(np.int16))


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((5, 7), (11, 13)),
        ((448, 448), (1080, 1920)),
        ((448, 448), (300, 97)),
        ((3, 4), (3, 4)),
        ((448, 448), (4000, 3000)),
    ],
)
def test_upsampled_class_counts_are_those_of_the_upsampled_map(shape, size):
    class_map = rng(shape[0]).integers(0, 5, shape).astype(np.uint8)
    class_map[class_map == 3] = 0  # a class with no pixel counts 0
    expected = F.interpolate(torch.from_numpy(class_map).float()[None, None], size=size, mode="nearest")
    counts = np.bincount(expected[0, 0].long().numpy().ravel(), minlength=6)
    got = P.upsampled_class_counts(class_map, size, 6)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, counts)
    assert got.sum() == size[0] * size[1] and got[3] == 0


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("num_classes", [2, 256, 1000])
def test_png_round_trip(num_classes):
    class_map = rng(num_classes).integers(0, num_classes, (61, 83))
    class_map[0, 0] = num_classes - 1
    palette = P.build_palette(num_classes - 1)
    data = P.encode_png(class_map.astype(np.uint8 if num_classes <= 256 else np.int16), palette)
    decoded = P.decode_png(data)
    np.testing.assert_array_equal(decoded, class_map)
    image = Image.open(io.BytesIO(data))
    if num_classes <= 256:
        assert image.mode == "P" and decoded.dtype == np.uint8
        assert image.getpalette() == palette.ravel().tolist()
    else:
        assert image.mode.startswith("I") and decoded.dtype == np.uint16


def test_png_grey_round_trip():
    grey = rng(0).integers(0, 256, (9, 4)).astype(np.uint8)
    np.testing.assert_array_equal(P.decode_png(P.encode_png(grey, None)), grey)


# ----------------------------------------------------------------------------- bad inputs


def image(x):
    return P.prepare_image(x, SIZE, name="a.jpg")


def labels(x, **kwargs):
    return P.prepare_mask(x, SIZE, mask_format="labels", name="m.png", **kwargs)


def rgb(x, **kwargs):
    return P.prepare_mask(x, SIZE, mask_format="rgb", name="m.png", **kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: image(Image.new("RGB", (0, 5))), "a.jpg: empty"),
        (lambda: image(np.zeros((4, 0, 3), np.uint8)), "a.jpg: empty"),
        (lambda: image(np.zeros((4, 4, 3), np.float32)), "a.jpg: .*dtype float32"),
        (lambda: image(np.zeros((2, 4, 4, 3), np.uint8)), "a.jpg: .*shape"),
        (lambda: image(np.zeros((4, 4, 2), np.uint8)), "a.jpg: .*shape"),
        (lambda: image("a.jpg"), "a.jpg: expected a PIL image"),
        (lambda: labels(np.zeros((4, 5), np.uint8), image_size=(5, 4)), "m.png: mask is 4x5 .* image is 5x4"),
        (lambda: labels(np.full((4, 5), 3), num_labels=2), "m.png: label 3 is outside 0..2"),
        (lambda: labels(np.full((4, 5), -1), num_labels=2), "m.png: label -1"),
        (lambda: labels(np.full((4, 5), 300)), "m.png: label 300 is outside 0..255"),
        (lambda: labels(np.zeros((4, 5), np.float32)), "m.png: .*integers, got dtype float32"),
        (lambda: labels(np.zeros((4, 5, 3), np.uint8)), r"m.png: a label mask must have shape \(H, W\)"),
        (lambda: labels(Image.new("RGB", (5, 4))), "m.png: .*single-channel.*mode RGB"),
        (lambda: labels(np.zeros((0, 5), np.uint8)), "m.png: empty"),
        (lambda: rgb(np.zeros((4, 5, 3), np.uint8), image_size=(4, 6)), "m.png: mask is 4x5"),
        (lambda: rgb(np.zeros((4, 5), np.uint16)), "m.png: .*dtype uint16"),
        (
            lambda: P.prepare_mask(np.zeros((4, 5), np.uint8), SIZE, mask_format="auto", name="m.png"),
            "m.png: mask_format",
        ),
        (lambda: P.encode_png(np.full((2, 2), 3, np.uint8), P.build_palette(2)), "class ids must be in 0..2"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
