"""`cpu-stages` times preprocess (decode + resize, with and without `input.jpeg_draft`) and postprocess (upsample,
PNG, counts) per image on one core at several image sizes, and says how many cores keep one GPU busy.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from PIL import Image

from jobs.benchmark.harness import finish_parser, write_record
from jobs.benchmark.model import GPU_PEAK_TFLOPS, model_flops, vit_large


def _photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """A photo-like JPEG (smooth colour, quality 90) of `width` x `height`."""
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _stage_seconds(data: bytes, images: int, palette: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Seconds per image of preprocess (decode, draft) and postprocess (post) over `images` copies of `data`."""
    from pipeline.labelling.postprocess import postprocess
    from pipeline.labelling.preprocess import preprocess

    batch = {
        "key": np.array([f"{i}.jpg" for i in range(images)], object),
        "source": np.array(["x"] * images, object),
        "bytes": np.array([data] * images, object),
        "error": np.array([None] * images, object),
        "shard_images": np.zeros(images, np.int64),
    }
    warm = preprocess({name: column[:1] for name, column in batch.items()}, size=(448, 448), exif_transpose=True)
    warm["class_map"], warm["score"] = np.zeros((1, 448, 448), np.uint8), np.ones(1, np.float32)
    warm["class_scores"] = np.ones((1, len(palette)), np.float32)
    postprocess(warm, palette=palette, model="m", prompt_set="p")  # first calls: lazy imports and set-up
    seconds = {}
    for draft in (False, True):
        start = time.perf_counter()
        pre = preprocess(dict(batch), size=(448, 448), exif_transpose=True, jpeg_draft=draft)
        seconds["draft" if draft else "decode"] = (time.perf_counter() - start) / images
    pre.pop("pixels")
    blocks = rng.integers(0, 4, (images, 14, 14), dtype=np.uint8)  # regions, as a model paints them
    pre["class_map"] = blocks.repeat(32, axis=1).repeat(32, axis=2)
    pre["score"] = np.ones(images, np.float32)
    pre["class_scores"] = np.ones((images, len(palette)), np.float32)
    start = time.perf_counter()
    postprocess(pre, palette=palette, model="m", prompt_set="p")
    seconds["post"] = (time.perf_counter() - start) / images
    return seconds


def benchmark_cpu_stages(args: argparse.Namespace) -> None:
    """The CPU work around the model, per image on one core (this process, one thread): decode + resize
    (`preprocess`, with and without `input.jpeg_draft`) and upsample + PNG + counts (`postprocess`), at each
    `--sizes`; then the cores one GPU needs to be kept busy at `--gpu-images-per-second`."""
    from model.processing import build_palette

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    palette = build_palette(3)
    gpu_rate = args.gpu_images_per_second or (
        GPU_PEAK_TFLOPS["H100"]["bfloat16"] * 1e12 * args.mfu / model_flops(vit_large(24), 1, args.prompts)
    )
    print(
        f"CPU stages per image on one core ({os.cpu_count()} CPUs here), {args.images} photo-like JPEGs per size "
        f"(quality 90); one GPU labelling {gpu_rate:.0f} images/s ({args.prompts} prompt(s))"
        + (
            ""
            if args.gpu_images_per_second
            else f": ViT-L bfloat16 at {args.mfu:.0%} of an H100's dense peak, an estimate until measured on one"
        )
    )
    print(f"  {'size':<12}{'decode+resize':>15}{'draft':>9}{'post':>8}{'cores/GPU':>11}{'with draft':>12}")
    rows = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        timings = _stage_seconds(_photo_jpeg(width, height, rng), args.images, palette, rng)
        timings["cores_per_gpu"] = gpu_rate * (timings["decode"] + timings["post"])
        timings["cores_per_gpu_draft"] = gpu_rate * (timings["draft"] + timings["post"])
        rows[size] = timings
        print(
            f"  {size:<12}{timings['decode'] * 1e3:12.1f} ms{timings['draft'] * 1e3:6.1f} ms"
            f"{timings['post'] * 1e3:5.1f} ms{timings['cores_per_gpu']:11.1f}{timings['cores_per_gpu_draft']:12.1f}"
        )
    write_record(
        args.json,
        {"benchmark": "cpu-stages", **vars(args), "gpu_images_per_second": gpu_rate, "per_image_seconds": rows},
    )


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `cpu-stages` subcommand."""
    parser = sub.add_parser(
        "cpu-stages", help="preprocess and postprocess per image on one core; cores per GPU", description=__doc__
    )
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1920x1080", "4000x3000"], help="WIDTHxHEIGHT")
    parser.add_argument("--images", type=int, default=8, help="images per size")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per image (the GPU's work per image)")
    parser.add_argument("--gpu-images-per-second", type=float, help="a measured GPU rate (default: estimated)")
    parser.add_argument("--mfu", type=float, default=0.5, help="the estimate's share of the GPU's peak")
    return finish_parser(parser, benchmark_cpu_stages)
