"""`heldout` runs the whole labelling job with a checkpoint (default: the demo's bundled model) on held-out
synthetic tasks and scores it with `evaluate`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jobs.benchmark.harness import DEMO_CHECKPOINT, finish_parser, start_local_ray, write_record

if TYPE_CHECKING:
    from pipeline.results import Evaluation


def label_and_evaluate(
    images: Path, prompts: Path, classes: list[str], checkpoint: str, out: Path, truth: Path
) -> Evaluation:
    """Label `images` with `prompts` through the whole job into `out`; `evaluate`'s scores against `truth`."""
    from pipeline.labelling.job import autolabel
    from pipeline.results.evaluate import evaluate

    autolabel(
        {
            "input": {"uri": str(images)},
            "prompts": {"uri": str(prompts), "classes": classes},
            "model": {"checkpoint": checkpoint},
            "output": {"uri": str(out)},
            "compute": {"batch_size": 4},
        },
        log=lambda line: None,
    )
    return evaluate(str(out), str(truth))


def benchmark_heldout(args: argparse.Namespace) -> None:
    """The whole labelling job with a checkpoint on held-out synthetic tasks (seeds training never draws), scored
    by `evaluate` against their ground truth: mean IoU per task and over all tasks."""
    from jobs.demo.build import write_sample

    start_local_ray()
    tasks = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.tasks):
            root = Path(folder) / f"task{seed}"
            classes = write_sample(root, seed, images=args.images)
            result = label_and_evaluate(
                root / "images", root / "prompts", classes, args.checkpoint, root / "out", root / "truth"
            )
            tasks.append(
                {"seed": seed, "classes": classes, "mean_iou": result.mean_iou, "pixel_accuracy": result.pixel_accuracy}
            )
            print(
                f"task seed {seed} ({', '.join(classes)}): mean IoU {result.mean_iou:.3f}, "
                f"pixel accuracy {result.pixel_accuracy:.3f}"
            )
    scores = [task["mean_iou"] for task in tasks]
    mean, low, high = float(np.mean(scores)), float(np.min(scores)), float(np.max(scores))
    print(
        f"held-out mean IoU over {args.tasks} tasks of {args.images} images: {mean:.3f} "
        f"(min {low:.3f}, max {high:.3f}); checkpoint {args.checkpoint}"
    )
    write_record(
        args.json,
        {"benchmark": "heldout", **vars(args), "per_task": tasks, "mean_iou": {"mean": mean, "min": low, "max": high}},
    )


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `heldout` subcommand."""
    parser = sub.add_parser(
        "heldout", help="a checkpoint through the whole job on held-out synthetic tasks: mIoU", description=__doc__
    )
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=1000)
    return finish_parser(parser, benchmark_heldout)
