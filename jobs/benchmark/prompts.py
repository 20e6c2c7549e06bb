"""`prompts` makes labelled synthetic pools (one task each, every class shown with probability `--presence`), runs
`select-prompts` on each and then `tune` from the best single prompt, and reports validation mean IoU: the chosen
set, the best single prompt and random sets; the tuned prompt (the checkpoint best on validation) before and after
on both parts of the pool.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.benchmark.harness import DEMO_CHECKPOINT, finish_parser, start_local_ray, write_record


def write_pictures(folder: Path, pictures: list[tuple[np.ndarray, np.ndarray]], masks_to: Path | None = None) -> None:
    """Each (image, label map) as `imgNNNN.png` in a new `folder`, its labels beside it as `imgNNNN.mask.png`, or
    as `imgNNNN.png` in `masks_to`."""
    folder.mkdir(parents=True)
    for i, (image, labels) in enumerate(pictures):
        Image.fromarray(image).save(folder / f"img{i:04d}.png")
        Image.fromarray(labels).save((masks_to or folder) / f"img{i:04d}{'.png' if masks_to else '.mask.png'}")


def _pool_record(folder: Path, seed: int, args: argparse.Namespace) -> dict:
    """One pool of task `seed`: select-prompts on it, then tune from its best single prompt; their scores."""
    from pipeline.prompts.select import select_prompts
    from pipeline.prompts.tune import tune
    from pipeline.training.synthetic import random_task, render

    pool = folder / f"pool{seed}"
    rng = np.random.default_rng(seed)
    task = random_task(rng, args.classes)
    write_pictures(pool, [render(task, rng, (64, 64), presence=args.presence) for _ in range(args.images)])
    classes = tuple(f"class{c}" for c in range(1, args.classes + 1))
    chosen = select_prompts(
        str(pool),
        checkpoint=args.checkpoint,
        classes=classes,
        k=args.k,
        to=str(folder / f"chosen{seed}"),
        candidates=args.candidates,
        seed=seed,
        val_fraction=args.val_fraction,
        log=lambda line: None,
    )
    start = chosen.best_single["key"].removesuffix(".png")
    tuned = tune(
        {
            "model": {"checkpoint": args.checkpoint},
            "prompt": {"uri": str(pool), "name": start, "classes": list(classes)},
            "data": {"uri": str(pool), "val_fraction": args.val_fraction, "seed": seed},
            "train": {"steps": args.steps, "lr": args.lr, "log_every": 50, "checkpoint_every": 100},
            "output": {"uri": str(folder / f"tuned{seed}")},
            "compute": {"cpus_per_worker": os.cpu_count()},
        },
        log=lambda line: None,
    )
    return {
        "seed": seed,
        "chosen": chosen.steps[chosen.kept["step"] - 1]["mean_iou"],
        "best_single": chosen.best_single["mean_iou"],
        "random": chosen.random["mean_iou"],
        "tuned_step": tuned.chosen_step,
        **{f"tuned_{part}_{when}": value for part, scores in tuned.scores.items() for when, value in scores.items()},
    }


def benchmark_prompts(args: argparse.Namespace) -> None:
    """select-prompts and tune on held-out synthetic pools: validation mean IoU of each choice."""
    start_local_ray()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.pools):
            record = _pool_record(Path(folder), seed, args)
            records.append(record)
            print(
                f"pool seed {seed}: chosen {args.k}-set {record['chosen']:.3f}, best single "
                f"{record['best_single']:.3f}, random {args.k}-sets {record['random']:.3f}; tuned from the best "
                f"single: training "
                f"{record['tuned_training_before']:.3f} -> {record['tuned_training_after']:.3f}, validation "
                f"{record['tuned_validation_before']:.3f} -> {record['tuned_validation_after']:.3f} (the prompt of "
                f"step {record['tuned_step']})",
                flush=True,
            )
    means = {key: float(np.mean([r[key] for r in records])) for key in records[0] if key not in ("seed", "tuned_step")}
    print("mean over pools: " + ", ".join(f"{key} {value:.3f}" for key, value in means.items()))
    write_record(args.json, {"what": "prompts", "args": vars(args), "pools": records, "mean": means})


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `prompts` subcommand."""
    parser = sub.add_parser(
        "prompts", help="select-prompts and tune on held-out synthetic pools: validation mIoU", description=__doc__
    )
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    parser.add_argument("--pools", type=int, default=3)
    parser.add_argument("--images", type=int, default=120, help="images per pool")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--presence", type=float, default=0.4, help="the chance that an image shows a class")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=200, help="tuning steps of 8 images")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--first-seed", type=int, default=2000)
    return finish_parser(parser, benchmark_prompts)
