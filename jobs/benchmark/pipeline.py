"""`pipeline` runs the whole job on a fresh local Ray over synthetic JPEGs and times the model alone on the same
batches before and after the job (each in a child process): end-to-end images/s, model-only images/s, their ratio,
and the peak memory of the driver and of every Ray process (sampled from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from jobs.benchmark.harness import ProcessPeaks, finish_parser, in_child, sync, write_record
from jobs.benchmark.model import vit_large
from model import SegGpt, SegGptConfig, load_model
from model.checkpoint import DTYPES
from model.processing import normalize


def synthetic_job(root: Path, args: argparse.Namespace, images: int) -> dict:
    """A job config over `images` random 640x480 JPEGs under `root`, with a random ViT-L-width checkpoint and
    prompt set (made once per root)."""
    rng = np.random.default_rng(0)
    if not (root / "checkpoint").exists():
        for folder in ("checkpoint", "prompts"):
            (root / folder).mkdir(parents=True)
        config = vit_large(args.layers)
        torch.manual_seed(0)
        save_file(SegGpt(SegGptConfig(**config)).state_dict(), root / "checkpoint" / "model.safetensors")
        (root / "checkpoint" / "config.json").write_text(json.dumps(config))
        for i in range(args.prompts):
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "prompts" / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 3, (480, 640), dtype=np.uint8)).save(root / "prompts" / f"{i}.png")
    folder = root / f"images-{images}"
    folder.mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return {
        "input": {"uri": str(folder), "jpeg_draft": args.jpeg_draft},
        "prompts": {"uri": str(root / "prompts"), "classes": ["a", "b"]},
        "model": {"checkpoint": str(root / "checkpoint"), "dtype": args.dtype},
        "output": {"uri": str(root / f"out-{images}"), "resume": False},
        "compute": {
            "batch_size": args.batch,
            "cpus_per_actor": args.cpus_per_actor,
            "cpus_per_task": args.cpus_per_task,
        },
    }


def measured_job(job: dict) -> dict:
    """Run the job on a fresh local Ray; its summary and the peak memory of every process."""
    import ray

    from pipeline.labelling.job import autolabel

    ray.shutdown()
    with ProcessPeaks() as peaks:
        summary = autolabel(job, log=lambda line: None)
        ray.shutdown()  # inside: Ray's processes are sampled up to their end
    return {
        "images": summary.ok + summary.error,
        "ok": summary.ok,
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "peaks_kib": peaks.by_role(),
        "private_peaks_kib": peaks.by_role("private_kib"),
        "cpu_seconds": peaks.cpu_by_role(),
    }


def print_peaks(peaks: dict[str, dict[str, int]]) -> None:
    """A table of peak memory by process kind, one column per run or measure."""
    runs = list(peaks)
    roles = list(dict.fromkeys(role for run in runs for role in peaks[run]))
    print(f"  {'peak RSS (MiB)':<58}" + "".join(f"{run:>12}" for run in runs))
    for role in roles:
        cells = "".join(f"{peaks[run][role] / 1024:12.0f}" if role in peaks[run] else f"{'-':>12}" for run in runs)
        print(f"  {role[:58]:<58}{cells}")


def job_description(args: argparse.Namespace) -> str:
    """The config of the benchmarked job, in a line."""
    return (
        f"ViT-L width, {args.layers} layers, 896x448, {args.prompts} prompts, batch {args.batch}, dtype "
        f"{args.dtype}, 640x480 JPEGs{' (draft decoding)' if args.jpeg_draft else ''}, device {args.device}, "
        f"cpus_per_actor {args.cpus_per_actor}, cpus_per_task {args.cpus_per_task}, {os.cpu_count()} CPUs"
    )


def _model_only_rate(checkpoint: str, args: argparse.Namespace, batches: int) -> float:
    """Images/s of `predict` alone on batches as the inference actor makes them, in this process, with the actor's
    threads and allocator."""
    from model.memory import keep_freed_memory

    if args.device == "cpu":
        torch.set_num_threads(max(1, int(args.cpus_per_actor)))  # as Ray gives the actor (OMP_NUM_THREADS)
        keep_freed_memory()
    model = load_model(checkpoint, dtype=args.dtype, device=args.device)
    model.set_attention("auto")
    k, dtype, device = args.prompts, DTYPES[args.dtype], torch.device(args.device)
    pixels = torch.randint(0, 256, (args.batch * k, 448, 448, 3), dtype=torch.uint8, device=device)
    prompts = [normalize(pixels, dtype) for _ in range(2)]
    times = []
    with torch.inference_mode():
        for _ in range(batches + 1):
            sync(device)
            start = time.perf_counter()
            model.predict(normalize(pixels, dtype), *prompts, num_prompts=k, embedding_type="semantic")
            sync(device)
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times[1:])


def benchmark_pipeline(args: argparse.Namespace) -> None:
    """The whole job against the model alone, same run: the share of the job's time the model is busy.

    The model alone is timed before and after the job (in a child process each, as the actor runs it), so that
    the machine's drift over the job's minutes hits both sides; the ratio is against their mean.
    """
    batches = max(2, args.images // args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        job = synthetic_job(Path(tmp), args, args.images)
        checkpoint = job["model"]["checkpoint"]
        before = in_child(_model_only_rate, checkpoint, args, batches)
        run = measured_job(job)
        after = in_child(_model_only_rate, checkpoint, args, batches)
    model_rate = (before + after) / 2
    print(f"config: {job_description(args)}, {args.images} images")
    print(f"      job: {run['images_per_second']:8.4f} images/s ({run['ok']} ok in {run['seconds']:.1f} s)")
    print(
        f"    model: {model_rate:8.4f} images/s (predict alone, same batches, as the actor runs it; "
        f"{before:.4f} before the job, {after:.4f} after)"
    )
    print(f"     busy: {run['images_per_second'] / model_rate:.0%} of the model-only rate")
    print_peaks({"peak RSS": run["peaks_kib"], "private": run["private_peaks_kib"]})
    print(f"  CPU seconds over the job's {run['seconds']:.1f} s (wall) on {os.cpu_count()} CPUs:")
    for role, seconds in run["cpu_seconds"].items():
        print(f"  {role[:58]:<58}{seconds:12.1f}")
    write_record(
        args.json,
        {
            "benchmark": "pipeline",
            **vars(args),
            "job": run,
            "model_images_per_second": model_rate,
            "model_before_after": [before, after],
            "ratio": run["images_per_second"] / model_rate,
        },
    )


def job_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a benchmarked job (`pipeline` and `scale`)."""
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (ViT-L has 24)")
    parser.add_argument("--images", type=int, default=16, help="images (N for scale)")
    parser.add_argument("--batch", type=int, default=4, help="images per model batch")
    parser.add_argument("--prompts", type=int, default=1, help="prompts in the set")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--jpeg-draft", action="store_true", help="input.jpeg_draft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `pipeline` subcommand."""
    parser = sub.add_parser("pipeline", help="the whole job on local Ray vs the model alone", description=__doc__)
    return finish_parser(job_arguments(parser), benchmark_pipeline)
