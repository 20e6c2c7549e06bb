"""`select` judges `select-prompts` outside itself: per held-out synthetic task it makes a small pool (default 20
images, two classes, each shown with probability 0.5), writes its selection with the defaults, and labels held-out
queries of the same task through the whole job with the written set and with random K-sets of the pool, scored by
`evaluate`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jobs.benchmark.harness import DEMO_CHECKPOINT, finish_parser, start_local_ray, write_record
from jobs.benchmark.heldout import label_and_evaluate
from jobs.benchmark.prompts import write_pictures


def _task_record(root: Path, seed: int, args: argparse.Namespace, classes: list[str]) -> dict:
    """Task `seed` under `root`: its pool and queries, the written selection and random K-sets, each scored on the
    queries through the whole job."""
    from pipeline.prompts.select import select_prompts
    from pipeline.training.synthetic import random_task, render

    rng = np.random.default_rng(seed)
    task = random_task(rng, args.classes)
    write_pictures(root / "pool", [render(task, rng, (64, 64), presence=args.presence) for _ in range(args.images)])
    (root / "truth").mkdir(parents=True)
    write_pictures(root / "queries", [render(task, rng, (64, 64)) for _ in range(args.queries)], root / "truth")
    chosen = select_prompts(
        str(root / "pool"),
        checkpoint=args.checkpoint,
        classes=tuple(classes),
        k=args.k,
        to=str(root / "chosen"),
        seed=seed,
        log=lambda line: None,
    )

    def score(prompts: Path, name: str) -> float:
        return label_and_evaluate(
            root / "queries", prompts, classes, args.checkpoint, root / f"out-{name}", root / "truth"
        ).mean_iou

    randoms = []
    for draw in range(args.random_draws):
        prompts = root / f"random{draw}"
        prompts.mkdir()
        for i in sorted(rng.choice(args.images, args.k, replace=False).tolist()):
            for suffix in (".png", ".mask.png"):
                shutil.copy(root / "pool" / f"img{i:04d}{suffix}", prompts / f"img{i:04d}{suffix}")
        randoms.append(score(prompts, f"random{draw}"))
    return {
        "seed": seed,
        "kept_prompts": len(chosen.names),
        "validation_images": chosen.counts["validation"],
        "validation_score": chosen.steps[chosen.kept["step"] - 1]["mean_iou"],
        "written": score(root / "chosen", "chosen"),
        "random_mean": float(np.mean(randoms)),
        "random": randoms,
    }


def benchmark_select(args: argparse.Namespace) -> None:
    """select-prompts judged outside itself: per held-out synthetic task, a pool, `--queries` other images of the task
    through the whole job with the written set and with random K-sets of the pool, all scored by `evaluate`."""
    start_local_ray()
    classes = [f"class{c}" for c in range(1, args.classes + 1)]
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.tasks):
            record = _task_record(Path(folder) / f"task{seed}", seed, args, classes)
            records.append(record)
            print(
                f"task seed {seed}: written set ({record['kept_prompts']} prompts, validation "
                f"{record['validation_score']:.3f} on {record['validation_images']} images) {record['written']:.3f} "
                f"on {args.queries} held-out queries; random {args.k}-sets {record['random_mean']:.3f} "
                f"({', '.join(f'{r:.3f}' for r in record['random'])})",
                flush=True,
            )
    written, random = (float(np.mean([r[key] for r in records])) for key in ("written", "random_mean"))
    wins = sum(r["written"] >= r["random_mean"] for r in records)
    print(
        f"over {args.tasks} tasks: written set {written:.3f}, random {args.k}-sets {random:.3f}; the written set "
        f"at least the random mean in {wins} of {args.tasks}"
    )
    write_record(
        args.json,
        {"what": "select", "args": vars(args), "tasks": records, "mean": {"written": written, "random": random}},
    )


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `select` subcommand."""
    parser = sub.add_parser(
        "select", help="select-prompts' written set vs random K-sets, through the whole job", description=__doc__
    )
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--images", type=int, default=20, help="images per pool")
    parser.add_argument("--queries", type=int, default=8, help="held-out images per task, labelled by the job")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--presence", type=float, default=0.5, help="the chance that a pool image shows a class")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=3000)
    return finish_parser(parser, benchmark_select)
