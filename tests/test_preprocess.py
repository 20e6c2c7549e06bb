"""Preprocess (`pipeline.labelling.preprocess`): encoded bytes -> uint8 pixels at the model size, or an error row.

Batches are built the way Ray Data hands them to `map_batches(batch_format="numpy")`: an Arrow block with
the read stage's schema converted by Ray's own block accessor (no Ray cluster needed).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import ExifTags, Image, ImageOps
from ray.data.block import BlockAccessor

from model.processing import prepare_image
from pipeline.labelling.preprocess import preprocess
from pipeline.storage.formats import READ_SCHEMA

REPO = Path(__file__).resolve().parents[1]

SIZE = (24, 16)  # (height, width); not square, so that a swapped axis shows
OUTPUT_COLUMNS = {"key", "source", "shard_images", "status", "error", "width", "height", "pixels"}


def _batch(rows: list[tuple[str, bytes, str | None]]) -> dict[str, np.ndarray]:
    table = pa.table(
        {
            "key": [key for key, _, _ in rows],
            "source": [f"s3://bucket/in/{key}" for key, _, _ in rows],
            "bytes": [data for _, data, _ in rows],
            "error": [error for _, _, error in rows],
            "shard_images": list(range(len(rows))),
        },
        schema=READ_SCHEMA,
    )
    return BlockAccessor.for_block(table).to_batch_format("numpy")


def _run(rows, *, exif_transpose: bool = True, size=SIZE, jpeg_draft: bool = False, **options) -> dict[str, np.ndarray]:
    out = preprocess(_batch(rows), size=size, exif_transpose=exif_transpose, jpeg_draft=jpeg_draft, **options)
    _check_columns(out, rows, size)
    return out


def _check_columns(out: dict, rows: list, size) -> None:
    n = len(rows)
    assert set(out) == OUTPUT_COLUMNS  # `bytes` is dropped
    assert list(out["key"]) == [key for key, _, _ in rows]
    assert list(out["source"]) == [f"s3://bucket/in/{key}" for key, _, _ in rows]
    assert out["status"].shape == out["error"].shape == (n,)
    assert out["status"].dtype.kind == out["error"].dtype.kind == "U"  # typed, never object arrays of None
    assert list(out["shard_images"]) == list(range(n))  # passed through
    assert out["width"].dtype == out["height"].dtype == np.int64
    assert out["width"].shape == out["height"].shape == (n,)
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (n, *size, 3)
    for i in range(n):
        assert out["status"][i] in ("ok", "error")
        if out["status"][i] == "ok":
            assert out["error"][i] == ""
            assert out["width"][i] > 0 and out["height"][i] > 0
        else:
            assert isinstance(out["error"][i], str) and out["error"][i]
            assert out["width"][i] == 0 and out["height"][i] == 0
            assert not out["pixels"][i].any()


def _encode(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def _photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h // 5 + 1, w // 5 + 1, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)


def _prepared(data: bytes, exif_transpose: bool = True) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return prepare_image(image, SIZE, exif_transpose=False)


# ----------------------------------------------------------------------------- good images


def test_good_jpeg_and_png():
    jpeg = _encode(_photo(40, 30, 1), "JPEG", quality=90)
    png = _encode(_photo(17, 53, 2), "PNG")
    out = _run([("a.jpg", jpeg, None), ("b/c.png", png, None)])
    assert list(out["status"]) == ["ok", "ok"]
    assert list(out["error"]) == ["", ""]
    assert (out["width"].tolist(), out["height"].tolist()) == ([40, 17], [30, 53])
    np.testing.assert_array_equal(out["pixels"][0], _prepared(jpeg))
    np.testing.assert_array_equal(out["pixels"][1], prepare_image(_photo(17, 53, 2), SIZE))


def _odd(mode: str) -> tuple[bytes, tuple[int, int, int]]:
    """An image of one flat colour in `mode`, and the RGB it must become."""
    if mode == "CMYK":
        return _encode(Image.new("CMYK", (21, 13), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)
    if mode == "LA":
        return _encode(Image.new("LA", (21, 13), (90, 10)), "PNG"), (90, 90, 90)  # alpha dropped
    if mode == "P":
        image = Image.new("P", (21, 13), 2)
        image.putpalette([0, 0, 0, 9, 9, 9, 10, 200, 30] + [0] * 759)
        return _encode(image, "PNG"), (10, 200, 30)
    if mode == "I;16":
        image = Image.fromarray(np.full((13, 21), 65535, np.uint16))
        return _encode(image, "PNG"), (255, 255, 255)
    if mode == "1":
        return _encode(Image.new("1", (21, 13), 1), "PNG"), (255, 255, 255)
    if mode == "RGBA":
        return _encode(Image.new("RGBA", (21, 13), (40, 50, 60, 0)), "PNG"), (40, 50, 60)
    if mode == "L":
        return _encode(Image.new("L", (21, 13), 77), "PNG"), (77, 77, 77)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["CMYK", "LA", "P", "I;16", "1", "RGBA", "L"])
def test_odd_modes(mode):
    data, colour = _odd(mode)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode  # the file really is in that mode
    out = _run([(f"odd-{mode}", data, None)])
    assert out["status"][0] == "ok", out["error"][0]
    assert (out["width"][0], out["height"][0]) == (21, 13)
    np.testing.assert_array_equal(out["pixels"][0], _prepared(data))
    tolerance = 2 if mode == "CMYK" else 0  # JPEG
    assert np.abs(out["pixels"][0].astype(int) - colour).max() <= tolerance


def test_sixteen_bit_scaled_to_eight_bit():
    values = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(SIZE[0], 0).repeat(SIZE[1] // 4, 1)
    data = _encode(Image.fromarray(values), "PNG")
    out = _run([("deep.png", data, None)])
    np.testing.assert_array_equal(out["pixels"][0, 0, :: SIZE[1] // 4, 0], [0, 1, 128, 255])


# ----------------------------------------------------------------------------- EXIF


def _oriented_jpeg(orientation: int, w: int = 40, h: int = 24) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _encode(_photo(w, h, orientation), "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_rotated_jpeg(orientation):
    data = _oriented_jpeg(orientation)
    shown = _run([("r.jpg", data, None)], exif_transpose=True)
    stored = _run([("r.jpg", data, None)], exif_transpose=False)
    swapped = orientation >= 5
    assert (shown["width"][0], shown["height"][0]) == ((24, 40) if swapped else (40, 24))
    assert (stored["width"][0], stored["height"][0]) == (40, 24)
    with Image.open(io.BytesIO(data)) as image:
        as_shown = ImageOps.exif_transpose(image)
        np.testing.assert_array_equal(shown["pixels"][0], prepare_image(as_shown, SIZE, exif_transpose=False))
        image = Image.open(io.BytesIO(data))
        np.testing.assert_array_equal(stored["pixels"][0], prepare_image(image, SIZE, exif_transpose=False))
    assert not np.array_equal(shown["pixels"][0], stored["pixels"][0])


def test_jpeg_draft_decodes_at_a_reduced_scale_and_keeps_the_full_size():
    """A 200x120 JPEG (shown 120x200) for a model side of 24: the decoder's 1/4 scale (50x30) is the smallest
    still at least 24 both ways (1/8 would give 25x15). Width and height stay those of the full image."""
    data = _oriented_jpeg(6, w=200, h=120)
    draft = _run([("r.jpg", data, None)], jpeg_draft=True)
    full = _run([("r.jpg", data, None)])
    assert (draft["width"][0], draft["height"][0]) == (full["width"][0], full["height"][0]) == (120, 200)
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (24, 24))
        image.load()
        assert image.size == (50, 30)
        expected = prepare_image(ImageOps.exif_transpose(image), SIZE, exif_transpose=False)
    np.testing.assert_array_equal(draft["pixels"][0], expected)
    assert not np.array_equal(draft["pixels"][0], full["pixels"][0])
    stored = _run([("r.jpg", data, None)], jpeg_draft=True, exif_transpose=False)
    assert (stored["width"][0], stored["height"][0]) == (200, 120)
    png = _encode(_photo(200, 120), "PNG")  # not a JPEG: decoded in full as always
    np.testing.assert_array_equal(
        _run([("p.png", png, None)], jpeg_draft=True)["pixels"][0], _run([("p.png", png, None)])["pixels"][0]
    )


# ----------------------------------------------------------------------------- bad rows


def _truncated_jpeg() -> bytes:
    data = _encode(_photo(64, 48, 3), "JPEG", quality=95)
    return data[: len(data) // 2]


BAD = {
    "empty": (b"", "empty file"),
    "truncated": (_truncated_jpeg(), "cannot decode image: OSError: image file is truncated"),
    "random": (np.random.default_rng(4).bytes(2048), "not an image: cannot identify the image format"),
    "text": (b"key,value\nhello,world\n" * 20, "not an image: cannot identify the image format"),
    "header only": (_encode(_photo(64, 48, 5), "PNG")[:60], "cannot decode image"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_bytes_give_error_row(name):
    data, message = BAD[name]
    good = _encode(_photo(30, 20, 6), "PNG")
    out = _run([("before.png", good, None), (name, data, None), ("after.png", good, None)])
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert message in out["error"][1]
    np.testing.assert_array_equal(out["pixels"][0], out["pixels"][2])
    assert out["pixels"][0].any()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grey PNG of zeros, written by hand a row at a time: a few hundred kB for hundreds of MB of pixels.
    With `rows`, only that many rows of data follow the header (Pillow opens it all the same)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


BOMB_CHILD = """
import sys
from pipeline.labelling.preprocess import preprocess
from tests.test_preprocess import _batch, _grey_png

def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

bomb = _grey_png(12000, 12000)  # 144 M pixels: 432 MB as RGB; under Pillow's own limit (179 M)
before = peak_kib()
out = preprocess(_batch([("bomb.png", bomb, None)]), size=(64, 64), exif_transpose=True)
print(out["status"][0], peak_kib() - before, out["error"][0], sep="\\n")
"""


def test_decompression_bombs_are_refused_before_decoding_in_bounded_memory():
    child = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    status, grown_kib, message = child.stdout.strip().split("\n")
    assert status == "error", child.stderr
    assert message == "image too large: 12000x12000 = 144000000 pixels, over input.max_pixels (100000000)"
    assert int(grown_kib) < 32 * 1024  # nothing of the 432 MB was ever made

    declared = _grey_png(40000, 40000, rows=1)  # 1.6 G pixels declared, one row of data: Pillow refuses it itself
    small, large = _encode(_photo(30, 30, 7), "PNG"), _encode(_photo(40, 40, 7), "PNG")
    out = _run(
        [("declared.png", declared, None), ("small.png", small, None), ("large.png", large, None)], max_pixels=1000
    )  # 900 pixels pass, 1600 do not
    assert list(out["status"]) == ["error", "ok", "error"]
    assert out["error"][0].startswith("image too large: Image size (1600000000 pixels) exceeds limit")
    assert out["error"][2] == "image too large: 40x40 = 1600 pixels, over input.max_pixels (1000)"


def test_row_with_read_error_is_kept_as_is():
    good = _encode(_photo(30, 20, 8), "JPEG")
    rows = [
        ("gone.jpg", b"", "cannot read: FileNotFoundError: gone.jpg"),
        ("ok.jpg", good, None),
        ("flaky.jpg", good, "read failed after 4 tries"),  # bytes present, but the read said no: not decoded
    ]
    out = _run(rows)
    assert list(out["status"]) == ["error", "ok", "error"]
    assert out["error"][0] == "cannot read: FileNotFoundError: gone.jpg"
    assert out["error"][2] == "read failed after 4 tries"


def test_all_outcomes_in_one_batch():
    rows = [
        ("jpeg", _encode(_photo(40, 30, 9), "JPEG"), None),
        ("cmyk", _odd("CMYK")[0], None),
        ("empty", b"", None),
        ("random", BAD["random"][0], None),
        ("read", b"", "no such key"),
        ("png", _encode(_photo(31, 7, 10), "PNG"), None),
    ]
    out = _run(rows)
    assert list(out["status"]) == ["ok", "ok", "error", "error", "error", "ok"]
    assert out["width"].tolist() == [40, 21, 0, 0, 0, 31]
    assert out["height"].tolist() == [30, 13, 0, 0, 0, 7]


def test_empty_batch():
    out = _run([])
    assert out["pixels"].shape == (0, *SIZE, 3)
