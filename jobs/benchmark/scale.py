"""`scale` runs the whole job at N and 10 N images: time per image and the peak memory of every process at each
size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from jobs.benchmark.harness import finish_parser, write_record
from jobs.benchmark.pipeline import job_arguments, job_description, measured_job, print_peaks, synthetic_job

MEASURES = {"peaks_kib": "peak RSS", "private_peaks_kib": "peak private RSS (no object store)"}


def _growth(runs: dict[int, dict], small: int, large: int) -> dict[str, dict[str, float]]:
    """Per measure, each process kind's peak at 10 N over its peak at N; printed with a table of both."""
    growth = {}
    for measure, title in MEASURES.items():
        print(f"  {title}:")
        print_peaks({f"{images} images": run[measure] for images, run in runs.items()})
        before, after = runs[small][measure], runs[large][measure]
        growth[measure] = {role: after[role] / kib for role, kib in before.items() if role in after and kib}
        worst = max(growth[measure], key=growth[measure].get)
        print(
            f"  {title} 10N / N: largest growth {growth[measure][worst]:.2f}x ({worst}); driver "
            f"{growth[measure].get('driver', float('nan')):.2f}x; sum over processes "
            f"{sum(after.values()) / sum(before.values()):.2f}x"
        )
    return growth


def benchmark_scale(args: argparse.Namespace) -> None:
    """The whole job at N and 10 N images: time per image and the peak memory of every process."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for images in (args.images, 10 * args.images):
            runs[images] = measured_job(synthetic_job(Path(tmp), args, images))
            print(
                f"  {images} images: {runs[images]['seconds']:.1f} s, {runs[images]['seconds'] / images:.2f} s/image",
                flush=True,
            )
    print(f"config: {job_description(args)}")
    for images, run in runs.items():
        print(f"  {images:>6} images: {run['seconds'] / images:.3f} s/image ({run['images_per_second']:.3f} images/s)")
    growth = _growth(runs, args.images, 10 * args.images)
    write_record(args.json, {"benchmark": "scale", **vars(args), "runs": runs, "growth": growth})


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `scale` subcommand."""
    parser = sub.add_parser(
        "scale", help="the whole job at N and 10 N images: time per image, peak memory", description=__doc__
    )
    return finish_parser(job_arguments(parser), benchmark_scale)
