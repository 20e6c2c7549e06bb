"""The prompt set (`pipeline.prompts.sets`): layouts, mask formats, EXIF, fingerprint and the errors that stop a job."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import ExifTags, Image, ImageOps
from safetensors.torch import save as safetensors_bytes

from model.processing import build_palette, encode_png, prepare_image, prepare_mask
from pipeline.prompts.sets import PromptSet, PromptSetError, load_prompt_set, tuned_prompt_bytes

CLASSES = ("cat", "dog", "car")
N = len(CLASSES)
SIZE = (24, 16)  # (height, width) of the model input; not square, so that a swapped axis shows
PALETTE = build_palette(N)


# ----------------------------------------------------------------------------- helpers


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labels(h: int, w: int, seed: int, n: int = N) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, n + 1, (h, w)).astype(np.uint8)
    labels[0, 0], labels[-1, -1] = 0, n  # every prompt uses background and the last class
    return labels


def _save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


def _prompt(folder: Path, name: str, ext: str = "jpg", hw=(30, 20), seed: int = 0, labels=None) -> tuple[Path, Path]:
    """Writes `name.ext` and its label mask (`name.png`, or `name.mask.png` for a PNG image)."""
    image = _save(folder / f"{name}.{ext}", _pixels(*hw, seed), **({"quality": 95} if ext in ("jpg", "jpeg") else {}))
    mask_name = f"{name}.mask.png" if ext == "png" else f"{name}.png"
    mask = _save(folder / mask_name, _labels(*hw, seed + 100) if labels is None else labels)
    return image, mask


def _load(uri, **kwargs) -> PromptSet:
    options = {"classes": CLASSES, "mask_format": "labels", "embedding": "semantic", "size": SIZE} | kwargs
    return load_prompt_set(str(uri), **options)


def _expected_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return prepare_image(image, SIZE)


def _expected_mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        return prepare_mask(mask, SIZE, mask_format="labels", num_labels=N)


def _check_arrays(prompts: PromptSet, pairs: list[tuple[Path, Path]]) -> None:
    assert prompts.images.dtype == np.uint8 and prompts.masks.dtype == np.uint8
    assert prompts.images.shape == prompts.masks.shape == (len(pairs), *SIZE, 3)
    for k, (image, mask) in enumerate(pairs):
        np.testing.assert_array_equal(prompts.images[k], _expected_image(image))
        np.testing.assert_array_equal(prompts.masks[k], _expected_mask(mask))


# ----------------------------------------------------------------------------- layouts


def test_flat_folder_of_jpeg_and_png_pairs(tmp_path):
    a = _prompt(tmp_path, "a", "jpg", seed=1)
    b = _prompt(tmp_path, "b", "jpeg", hw=(17, 41), seed=2)
    (tmp_path / "README.txt").write_text("not a prompt")
    prompts = _load(tmp_path)
    assert prompts.names == ("a", "b")
    assert prompts.classes == CLASSES and prompts.embedding == "semantic"
    assert prompts.palette.dtype == np.uint8
    np.testing.assert_array_equal(prompts.palette, PALETTE)
    _check_arrays(prompts, [a, b])


def test_png_image_with_mask_png(tmp_path):
    pair = _prompt(tmp_path, "scene", "png", seed=3)
    prompts = _load(tmp_path)
    assert prompts.names == ("scene",)
    _check_arrays(prompts, [pair])


def test_jpeg_image_may_also_use_mask_png_name(tmp_path):
    image = _save(tmp_path / "a.jpg", _pixels(30, 20, 4))
    mask = _save(tmp_path / "a.mask.png", _labels(30, 20, 5))
    prompts = _load(tmp_path)
    assert prompts.names == ("a",)
    _check_arrays(prompts, [(image, mask)])


def test_nested_subfolders_give_relative_names(tmp_path):
    x = _prompt(tmp_path / "sub", "x", "jpg", seed=6)
    y = _prompt(tmp_path / "sub" / "deeper", "y", "png", seed=7)
    z = _prompt(tmp_path, "z", "webp", seed=8)
    prompts = _load(tmp_path)
    assert prompts.names == ("sub/deeper/y", "sub/x", "z")
    _check_arrays(prompts, [y, x, z])


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_manifest_paths_relative_to_manifest(tmp_path, suffix):
    root = tmp_path / "set"
    first = (_save(root / "img" / "one.jpg", _pixels(30, 20, 9)), _save(root / "lbl" / "m1.png", _labels(30, 20, 10)))
    second = (_save(root / "img" / "two.png", _pixels(12, 18, 11)), _save(root / "lbl" / "m2.png", _labels(12, 18, 12)))
    # listed out of alphabetical order: the manifest's order is kept
    entries = [{"image": "img/two.png", "mask": "lbl/m2.png"}, {"image": "img/one.jpg", "mask": "lbl/m1.png"}]
    manifest = root / f"prompts{suffix}"
    manifest.write_text(json.dumps(entries) if suffix == ".json" else yaml.safe_dump(entries))
    prompts = _load(manifest)
    assert prompts.names == ("img/two", "img/one")
    _check_arrays(prompts, [second, first])


def test_prompt_set_on_s3(tmp_path, s3_bucket):
    import s3fs

    bucket, storage_options = s3_bucket
    pairs = [_prompt(tmp_path / "p", "a", "jpg", seed=13), _prompt(tmp_path / "p" / "sub", "b", "png", seed=14)]
    fs = s3fs.S3FileSystem(**storage_options)
    for file in (tmp_path / "p").rglob("*.*"):
        fs.pipe(
            f"{bucket.removeprefix('s3://')}/prompts/{file.relative_to(tmp_path / 'p').as_posix()}", file.read_bytes()
        )
    manifest = [{"image": "a.jpg", "mask": "a.png"}]
    fs.pipe(f"{bucket.removeprefix('s3://')}/prompts/manifest.yaml", yaml.safe_dump(manifest).encode())
    fs.invalidate_cache()

    local = _load(tmp_path / "p")
    remote = _load(f"{bucket}/prompts", storage_options=storage_options)
    assert remote.names == local.names == ("a", "sub/b")
    _check_arrays(remote, pairs)
    assert remote.fingerprint == local.fingerprint  # the same files, classes and options

    from_manifest = _load(f"{bucket}/prompts/manifest.yaml", storage_options=storage_options)
    assert from_manifest.names == ("a",)
    _check_arrays(from_manifest, pairs[:1])

    with pytest.raises(PromptSetError, match="missing"):
        _load(f"{bucket}/missing", storage_options=storage_options)


def _parent_relative_manifest(write) -> None:
    """A manifest in `man/` whose entries point into the sibling folder `imgs/` with `../`."""
    write("imgs/a.jpg", _encode(_pixels(30, 20, 41), "JPEG"))
    write("imgs/a.png", _encode(_labels(30, 20, 42), "PNG"))
    write("man/m.yaml", yaml.safe_dump([{"image": "../imgs/a.jpg", "mask": "../imgs/a.png"}]).encode())


def _encode(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _local_writer(root: Path):
    def write(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    return write


def test_manifest_with_parent_relative_paths_local(tmp_path):
    _parent_relative_manifest(_local_writer(tmp_path))
    prompts = _load(tmp_path / "man" / "m.yaml")
    _check_arrays(prompts, [(tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "a.png")])


def test_manifest_with_parent_relative_paths_on_s3(tmp_path, s3_bucket):
    """BUG: `../` in a manifest works on local disk but not on S3 (the joined key is not normalised)."""
    import s3fs

    bucket, storage_options = s3_bucket
    fs = s3fs.S3FileSystem(**storage_options)
    _parent_relative_manifest(lambda rel, data: fs.pipe(f"{bucket.removeprefix('s3://')}/{rel}", data))
    fs.invalidate_cache()
    local = tmp_path / "local"
    _parent_relative_manifest(_local_writer(local))
    # fails today: PromptSetError "test-…/man/../imgs/a.jpg: cannot read: …"
    prompts = _load(f"{bucket}/man/m.yaml", storage_options=storage_options)
    _check_arrays(prompts, [(local / "imgs" / "a.jpg", local / "imgs" / "a.png")])


# ----------------------------------------------------------------------------- mask formats


def test_label_mask_painted_with_class_palette(tmp_path):
    labels = _labels(*SIZE, seed=15)
    _save(tmp_path / "a.jpg", _pixels(*SIZE, 16))
    _save(tmp_path / "a.png", labels)
    prompts = _load(tmp_path)
    # at the model size already: no resize, so every pixel is exactly its class colour
    np.testing.assert_array_equal(prompts.masks[0], PALETTE[labels])


def test_label_mask_resized_nearest_keeps_palette_colours(tmp_path):
    _prompt(tmp_path, "a", "jpg", hw=(61, 47), seed=17)
    prompts = _load(tmp_path)
    colours = {tuple(c) for c in prompts.masks[0].reshape(-1, 3)}
    assert colours <= {tuple(c) for c in PALETTE}
    assert len(colours) == N + 1


def _rgb_mask(labels: np.ndarray, kind: str) -> Image.Image:
    if kind == "RGB":
        return Image.fromarray(PALETTE[labels])
    if kind == "RGBA":
        return Image.fromarray(np.dstack([PALETTE[labels], np.full(labels.shape, 255, np.uint8)]))
    if kind == "P":  # what the job writes under masks/: indexed PNG, palette = class colours
        return Image.open(io.BytesIO(encode_png(labels, PALETTE)))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["RGB", "RGBA", "P"])
def test_rgb_mask_equals_equivalent_label_mask(tmp_path, kind):
    labels = _labels(30, 20, 18)
    image = _pixels(30, 20, 19)
    _save(tmp_path / "lab" / "a.png", image)
    _save(tmp_path / "lab" / "a.mask.png", labels)
    _save(tmp_path / "rgb" / "a.png", image)
    _save(tmp_path / "rgb" / "a.mask.png", _rgb_mask(labels, kind))
    from_labels = _load(tmp_path / "lab", mask_format="labels")
    from_rgb = _load(tmp_path / "rgb", mask_format="rgb")
    np.testing.assert_array_equal(from_rgb.masks, from_labels.masks)
    np.testing.assert_array_equal(from_rgb.images, from_labels.images)


def test_rgb_masks_with_many_classes(tmp_path):
    classes = tuple(f"c{i}" for i in range(300))  # palette > 256 colours
    labels = (np.arange(30 * 20).reshape(30, 20) % 301).astype(np.uint16)
    _save(tmp_path / "a.jpg", _pixels(30, 20, 20))
    _save(tmp_path / "a.png", build_palette(300)[labels])
    prompts = _load(tmp_path, classes=classes, mask_format="rgb")
    expected = prepare_mask(labels, SIZE, mask_format="labels", num_labels=300)
    np.testing.assert_array_equal(prompts.masks[0], expected)


# ----------------------------------------------------------------------------- EXIF


def _save_oriented(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _save(path, pixels, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_rotated_prompt_image_matches_mask_as_shown(tmp_path, ext):
    stored = np.zeros((20, 30, 3), np.uint8)  # height 20, width 30 as stored
    stored[:, :10] = 255  # a bright band on the stored left edge
    image_path = _save_oriented(tmp_path / f"a.{ext}", stored, orientation=6)
    with Image.open(image_path) as image:
        shown = ImageOps.exif_transpose(image)
        assert shown.size == (20, 30)  # (width, height) as a viewer shows it
        shown_array = np.asarray(shown.convert("RGB"))
    labels = (shown_array.mean(axis=2) > 127).astype(np.uint8)  # class 1 where the shown image is bright
    mask_path = _save(tmp_path / ("a.mask.png" if ext == "png" else "a.png"), labels)

    prompts = _load(tmp_path)
    np.testing.assert_array_equal(prompts.images[0], prepare_image(Image.fromarray(shown_array), SIZE))
    with Image.open(image_path) as image:
        assert not np.array_equal(prompts.images[0], prepare_image(image, SIZE, exif_transpose=False))
    np.testing.assert_array_equal(prompts.masks[0], _expected_mask(mask_path))
    # image and mask line up at the model size
    bright = prompts.images[0].mean(axis=2)
    on_class = (prompts.masks[0] == PALETTE[1]).all(axis=2)
    assert on_class.any() and (~on_class).any()
    assert bright[on_class].mean() > 200 and bright[~on_class].mean() < 55


def test_exif_rotated_prompt_image_rejects_mask_in_stored_orientation(tmp_path):
    _save_oriented(tmp_path / "a.jpg", _pixels(20, 30, 21), orientation=6)
    _save(tmp_path / "a.png", _labels(20, 30, 22))  # size of the stored pixels, not of the image as shown
    with pytest.raises(PromptSetError, match=r"a\.png.*20x30.*30x20"):
        _load(tmp_path)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path):
    labels = _labels(30, 20, 23)
    _save(tmp_path / "a.png", _pixels(30, 20, 24))
    mask = _save(tmp_path / "a.mask.png", Image.open(io.BytesIO(encode_png(labels, PALETTE))))
    base = _load(tmp_path)
    assert len(base.fingerprint) == 16 and int(base.fingerprint, 16) >= 0
    assert _load(tmp_path).fingerprint == base.fingerprint

    # P mask: valid as labels (its indices) and as rgb (its palette colours), same arrays
    as_rgb = _load(tmp_path, mask_format="rgb")
    np.testing.assert_array_equal(as_rgb.masks, base.masks)
    others = {
        "mask_format": as_rgb.fingerprint,
        "class name": _load(tmp_path, classes=("cat", "dog", "bus")).fingerprint,
        "embedding": _load(tmp_path, embedding="instance").fingerprint,
    }
    changed = labels.copy()
    changed[5, 5] = (changed[5, 5] + 1) % (N + 1)
    _save(mask, Image.open(io.BytesIO(encode_png(changed, PALETTE))))
    others["mask pixel"] = _load(tmp_path).fingerprint
    assert base.fingerprint not in others.values(), others
    assert len(set(others.values())) == len(others), others


# ----------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    with pytest.raises(PromptSetError, match="nowhere.*no such folder"):
        _load(tmp_path / "nowhere")


def test_missing_manifest(tmp_path):
    with pytest.raises(PromptSetError, match=r"nowhere\.yaml"):
        _load(tmp_path / "nowhere.yaml")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(PromptSetError, match="no prompts"):
        _load(tmp_path)


def test_image_without_mask(tmp_path):
    _prompt(tmp_path, "good", "jpg", seed=25)
    _save(tmp_path / "lonely.jpg", _pixels(10, 10, 26))
    with pytest.raises(PromptSetError, match=r"'lonely'.*lonely\.jpg"):
        _load(tmp_path)


def test_mask_without_image(tmp_path):
    _save(tmp_path / "orphan.mask.png", _labels(10, 10, 27))
    with pytest.raises(PromptSetError, match=r"orphan\.mask\.png"):
        _load(tmp_path)


@pytest.mark.parametrize(
    "files",
    [("a.jpg", "a.jpeg", "a.png"), ("a.jpg", "a.webp", "a.png"), ("a.jpg", "a.png", "a.mask.png")],
    ids=["jpg+jpeg", "jpg+webp", "jpg+png-image"],
)
def test_two_candidate_images_for_one_stem(tmp_path, files):
    for name in files:
        _save(tmp_path / name, _labels(10, 10, 28) if name.endswith(".png") else _pixels(10, 10, 29))
    with pytest.raises(PromptSetError, match=r"'a'.*needs one image") as caught:
        _load(tmp_path)
    for name in files[:2]:  # both candidate images are named
        assert name in str(caught.value)


def test_mask_size_differs_from_image(tmp_path):
    _save(tmp_path / "a.jpg", _pixels(30, 20, 30))
    _save(tmp_path / "a.png", _labels(30, 21, 31))
    with pytest.raises(PromptSetError, match=r"a\.png.*30x21.*30x20"):
        _load(tmp_path)


def test_label_above_number_of_classes(tmp_path):
    labels = _labels(30, 20, 32)
    labels[3, 4] = N + 1
    _prompt(tmp_path, "a", "jpg", labels=labels, seed=33)
    with pytest.raises(PromptSetError, match=rf"a\.png.*label {N + 1}.*0\.\.{N}"):
        _load(tmp_path)


def test_colour_label_mask_with_labels_format(tmp_path):
    _save(tmp_path / "a.jpg", _pixels(30, 20, 34))
    _save(tmp_path / "a.png", PALETTE[_labels(30, 20, 35)])
    with pytest.raises(PromptSetError, match=r"a\.png.*single-channel.*mask_format='rgb'"):
        _load(tmp_path)


def test_rgb_colour_not_in_palette(tmp_path):
    colours = PALETTE[_labels(30, 20, 36)]
    colours[7, 5] = (1, 2, 3)
    _save(tmp_path / "a.jpg", _pixels(30, 20, 37))
    _save(tmp_path / "a.png", colours)
    with pytest.raises(PromptSetError, match=r"a\.png: colour \(1, 2, 3\) at \(x=5, y=7\) is not a class colour"):
        _load(tmp_path, mask_format="rgb")


@pytest.mark.parametrize("broken", ["image", "mask", "truncated image", "empty image"])
def test_unreadable_file(tmp_path, broken):
    image, mask = _prompt(tmp_path, "a", "jpg", seed=38)
    if broken == "image":
        image.write_bytes(b"this is not a JPEG at all")
    elif broken == "mask":
        mask.write_bytes(np.random.default_rng(39).bytes(300))
    elif broken == "truncated image":
        image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    else:
        image.write_bytes(b"")
    bad = mask if broken == "mask" else image
    with pytest.raises(PromptSetError, match=rf"{bad.name}: not a readable image"):
        _load(tmp_path)


def _manifest(tmp_path: Path, content, suffix=".yaml") -> Path:
    _prompt(tmp_path, "a", "jpg", seed=40)
    path = tmp_path / f"m{suffix}"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    "entries",
    [
        [{"image": "a.jpg", "label": "a.png"}],
        [{"image": "a.jpg"}],
        [{"image": "a.jpg", "mask": "a.png", "weight": 2}],
        ["a.jpg"],
    ],
    ids=["wrong key", "missing key", "extra key", "not a mapping"],
)
def test_manifest_entries_with_wrong_keys(tmp_path, entries):
    path = _manifest(tmp_path, entries)
    with pytest.raises(PromptSetError, match=r"m\.yaml: entry 0 must have exactly the keys 'image' and 'mask'"):
        _load(path)


@pytest.mark.parametrize(
    "content", [{"image": "a.jpg", "mask": "a.png"}, "just text", ""], ids=["mapping", "scalar", "empty"]
)
def test_manifest_not_a_list(tmp_path, content):
    with pytest.raises(PromptSetError, match=r"m\.yaml: expected a list"):
        _load(_manifest(tmp_path, content))


def test_manifest_empty_list(tmp_path):
    with pytest.raises(PromptSetError, match="no prompts"):
        _load(_manifest(tmp_path, "[]", suffix=".json"))


def test_manifest_not_parseable(tmp_path):
    with pytest.raises(PromptSetError, match=r"m\.json: not a YAML/JSON manifest"):
        _load(_manifest(tmp_path, '[{"image": "a.jpg", "mask": ', suffix=".json"))


def test_manifest_entry_file_missing(tmp_path):
    path = _manifest(tmp_path, [{"image": "a.jpg", "mask": "gone.png"}])
    with pytest.raises(PromptSetError, match=r"gone\.png: cannot read"):
        _load(path)


def test_prompt_set_error_is_a_value_error():
    assert issubclass(PromptSetError, ValueError)


# ----------------------------------------------------------------------------- tuned prompt files


def _tuned(path: Path, seed: int, size=SIZE, classes=CLASSES, embedding="semantic") -> tuple[np.ndarray, np.ndarray]:
    """Writes a tuned prompt file of random tensors; returns them."""
    rng = np.random.default_rng(seed)
    image, mask = (rng.normal(0, 1, (3, *size)).astype(np.float32) for _ in range(2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        tuned_prompt_bytes(
            torch.from_numpy(image), torch.from_numpy(mask), classes=classes, embedding=embedding, step=7
        )
    )
    return image, mask


def test_tuned_prompt_file_alone_in_a_folder_and_in_a_manifest(tmp_path):
    image, mask = _tuned(tmp_path / "solo" / "tuned.safetensors", seed=1)
    alone = _load(tmp_path / "solo" / "tuned.safetensors")
    assert alone.names == ("tuned",) and alone.kinds == ("tuned",) and len(alone.images) == 0
    images, masks = alone.tensors()
    np.testing.assert_array_equal(images[0].numpy(), image)  # the file's tensors, bit for bit
    np.testing.assert_array_equal(masks[0].numpy(), mask)

    a = _prompt(tmp_path / "mixed", "a", seed=2)
    other_image, other_mask = _tuned(tmp_path / "mixed" / "z-tuned.safetensors", seed=3)
    mixed = _load(tmp_path / "mixed")
    assert mixed.names == ("a", "z-tuned") and mixed.kinds == ("pair", "tuned")
    images, masks = mixed.tensors()
    assert images.shape == masks.shape == (2, 3, *SIZE) and images.dtype == torch.float32
    np.testing.assert_array_equal(images[1].numpy(), other_image)
    np.testing.assert_array_equal(masks[1].numpy(), other_mask)
    # the pair as the model takes it: (x / 255 - mean) / std of the prepared image, channels first
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected = ((_expected_image(a[0]).astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(images[0].numpy(), expected, atol=1e-6)

    manifest = tmp_path / "mixed" / "prompts.yaml"
    manifest.write_text(yaml.safe_dump([{"tuned": "z-tuned.safetensors"}, {"image": "a.jpg", "mask": "a.png"}]))
    listed = _load(manifest)
    assert listed.names == ("a", "z-tuned") and listed.kinds == ("pair", "tuned")
    assert listed.fingerprint == mixed.fingerprint
    _tuned(tmp_path / "mixed" / "z-tuned.safetensors", seed=4)
    assert _load(manifest).fingerprint != listed.fingerprint  # the file's bytes count


@pytest.mark.parametrize(
    "case, message",
    [
        ("size", r"bad\.safetensors: image is 3x12x8, the model takes 3x24x16"),
        (
            "classes",
            r"bad\.safetensors: tuned for classes \['cat', 'dog'\], prompts.classes is \['cat', 'dog', 'car'\]",
        ),
        ("embedding", r"bad\.safetensors: tuned with embedding 'instance', prompts.embedding is 'semantic'"),
        ("garbage", r"bad\.safetensors: not a tuned prompt file"),
        ("model weights", r"bad\.safetensors: not a tuned prompt file: expected tensors 'image' and 'mask'"),
    ],
)
def test_bad_tuned_prompt_files_are_refused_naming_the_file(tmp_path, case, message):
    path = tmp_path / "prompts" / "bad.safetensors"
    _prompt(tmp_path / "prompts", "good", seed=5)
    if case == "size":
        _tuned(path, 0, size=(12, 8))
    elif case == "classes":
        _tuned(path, 0, classes=("cat", "dog"))
    elif case == "embedding":
        _tuned(path, 0, embedding="instance")
    elif case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    else:
        path.write_bytes(safetensors_bytes({"pos_embed": torch.zeros(3, *SIZE)}))
    with pytest.raises(PromptSetError, match=message):
        _load(tmp_path / "prompts")
