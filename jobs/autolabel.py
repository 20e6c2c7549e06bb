"""`seggpt-autolabel`: run the auto-labelling job from a YAML config, train, evaluate, export, review, choose or tune
prompts, or run the bundled demo.

    seggpt-autolabel run CONFIG.yaml [--set section.key=value ...] [--dry-run]
    seggpt-autolabel train CONFIG.yaml [--set section.key=value ...]
    seggpt-autolabel evaluate --labels OUTPUT_URI --truth URI [--ignore-index 255|none] [--lowest N] [--json URI]
    seggpt-autolabel export OUTPUT_URI --format coco|yolo-seg|masks [--to URI] [--classes a,b] [--min-area PX]
    seggpt-autolabel review OUTPUT_URI [--sample N] [--lowest N] [--class NAME] [--to URI]
    seggpt-autolabel select-prompts POOL_URI --checkpoint URI --k MAX --classes a,b [--val-fraction F] [--to URI]
    seggpt-autolabel tune CONFIG.yaml [--set section.key=value ...]
    seggpt-autolabel demo [--output DIR]

Exit code 0 when the job finished (even with per-image errors); 2 with a one-line reason naming the key or file when
it was refused before any work; 3 with a one-line reason naming the URI when storage stayed unreachable past
`storage.retry_s` (what was written before stays valid: run it again to resume); 1 with a traceback when anything
else stopped it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fsspec

from model import CheckpointError
from pipeline.config import ConfigError
from pipeline.evaluate import evaluate, report, table
from pipeline.export import FORMATS, ExportError, export
from pipeline.job import autolabel, dry_run
from pipeline.lease import OutputError
from pipeline.prompts import PromptSetError
from pipeline.read import InputError
from pipeline.review import ReviewError, review
from pipeline.select import SelectionError, select_prompts
from pipeline.storage import storage_failure
from pipeline.train import train
from pipeline.tune import tune

DEMO = Path(__file__).parent / "demo"
# What each command checks before any work: exit 2. Nothing raised once the work has started is among them (a file
# gone mid-run is an error row, or exit 1 with its traceback).
_REFUSALS = (ConfigError, PromptSetError, CheckpointError, InputError, OutputError, ExportError, ReviewError,
             SelectionError)


def demo_config(output: str) -> dict:
    """The config of the demo: the bundled sample, prompt set and checkpoint, on local Ray."""
    return {
        "input": {"uri": str(DEMO / "images")},
        "prompts": {"uri": str(DEMO / "prompts"), "classes": json.loads((DEMO / "classes.json").read_text())},
        "model": {"checkpoint": str(DEMO / "checkpoint")},
        "output": {"uri": str(Path(output).absolute()), "resume": False},
        "compute": {"batch_size": 4},
    }


def demo(output: str) -> None:
    """Label the bundled sample, score it against its ground truth and write its review page."""
    summary = autolabel(demo_config(output))
    print(summary)
    scores = evaluate(summary.output_uri, str(DEMO / "truth"))
    print(table(scores))
    page = review(summary.output_uri)
    print(f"demo: mean IoU {scores.mean_iou:.3f} against the sample's ground truth")
    print(f"look at: {page.page} (a page of {len(page.overlays)} overlays, lowest score first), "
          f"{summary.output_uri}/masks/*.png (indexed PNGs), {summary.output_uri}/labels/ (Parquet rows), "
          f"{summary.output_uri}/_job.json")


def _ignore_index(text: str) -> int | None:
    """`--ignore-index`: a label value, or `none`."""
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a label value (0..65535) or none, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seggpt-autolabel", description="Auto-label images with SegGPT on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job described by a YAML config")
    run.add_argument("config", help="path of the job's YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="check config, prompt set and checkpoint and count the inputs; label nothing")
    training = sub.add_parser("train", help="in-context training on Ray Train, from a YAML config")
    training.add_argument("config", help="path of the training's YAML config")
    training.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one config value (repeatable)")
    scoring = sub.add_parser("evaluate", help="score a job's output against ground-truth label maps")
    scoring.add_argument("--labels", required=True, metavar="OUTPUT_URI", help="the job's output (its labels/)")
    scoring.add_argument("--truth", required=True, metavar="URI",
                         help="label maps keyed like the inputs: NAME.png / NAME.mask.png beside the images, KEY.png, "
                              "WebDataset or Parquet shards with masks")
    scoring.add_argument("--ignore-index", type=_ignore_index, default=255, metavar="ID|none",
                         help="truth pixels with this value count nowhere (default 255; none: every id is a class)")
    scoring.add_argument("--lowest", type=int, default=5, metavar="N", help="list the N lowest-scoring images")
    scoring.add_argument("--mask-field", default="seg.png", help="the mask member of WebDataset truth samples")
    scoring.add_argument("--mask-column", default="mask", help="the mask column of Parquet truth shards")
    scoring.add_argument("--json", metavar="URI", help="where to write the scores (default OUTPUT_URI/_evaluation.json)")
    scoring.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                         help="fsspec options for both URIs, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'")
    exporting = sub.add_parser("export", help="write a job's labels as COCO, YOLO segmentation or label-map PNGs")
    exporting.add_argument("output", metavar="OUTPUT_URI", help="the job's output")
    exporting.add_argument("--format", required=True, choices=FORMATS)
    exporting.add_argument("--to", metavar="URI", help="where to write (default OUTPUT_URI/export/FORMAT)")
    exporting.add_argument("--classes", type=lambda text: text.split(","), metavar="A,B",
                           help="only these classes (the others become background)")
    exporting.add_argument("--min-area", type=int, default=0, metavar="PX", help="drop regions smaller than this")
    exporting.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                           help="fsspec options for both URIs")
    reviewing = sub.add_parser("review", help="overlay pictures and a static page of a job's labels")
    reviewing.add_argument("output", metavar="OUTPUT_URI", help="the job's output")
    reviewing.add_argument("--sample", type=int, metavar="N", help="picture N random ok images (default 100)")
    reviewing.add_argument("--lowest", type=int, metavar="N", help="picture the N lowest-scoring ok images")
    reviewing.add_argument("--class", dest="class_name", metavar="NAME",
                           help="only images with this class; --lowest by this class's score")
    reviewing.add_argument("--to", metavar="URI", help="where to write (default OUTPUT_URI/review)")
    reviewing.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                           help="fsspec options for the output, the sources and --to")
    selecting = sub.add_parser("select-prompts", help="choose K prompts from a labelled pool by validation mean IoU")
    selecting.add_argument("pool", metavar="POOL_URI", help="labelled images: image + NAME.png masks, tar or Parquet")
    selecting.add_argument("--checkpoint", required=True, metavar="URI", help="the model that will label with them")
    selecting.add_argument("--k", type=int, required=True,
                           help="the most prompts to choose (fewer where more do not score measurably better)")
    selecting.add_argument("--classes", required=True, type=lambda text: tuple(text.split(",")), metavar="A,B",
                           help="names of class ids 1, 2, ... of the pool's masks")
    selecting.add_argument("--val-fraction", type=float, metavar="F",
                           help="held out to score on (default 0.3 of the pool, at most about 300 images)")
    selecting.add_argument("--candidates", type=int, default=32, metavar="N", help="training images to choose from")
    selecting.add_argument("--random-draws", type=int, default=5, metavar="N", help="random K-sets to compare with")
    selecting.add_argument("--seed", type=int, default=0)
    selecting.add_argument("--actors", type=int, default=1, help="scoring actors (each takes a GPU where there are)")
    selecting.add_argument("--format", default="auto", choices=("auto", "images", "webdataset", "parquet"))
    selecting.add_argument("--embedding", default="semantic", choices=("semantic", "instance"))
    selecting.add_argument("--to", default="selected-prompts", metavar="URI",
                           help="the prompt folder to write (default ./selected-prompts)")
    selecting.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                           help="fsspec options for the pool, the checkpoint and --to")
    tuning = sub.add_parser("tune", help="in-context tuning of one prompt (model frozen) on Ray Train")
    tuning.add_argument("config", help="path of the tuning's YAML config")
    tuning.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    demo_parser = sub.add_parser("demo", help="label the bundled sample into ./seggpt-demo-output")
    demo_parser.add_argument("--output", default="seggpt-demo-output")
    args = parser.parse_args(argv)

    try:
        if args.command == "demo":
            demo(args.output)
        elif args.command == "evaluate":
            scores = evaluate(args.labels, args.truth, storage_options=args.storage_options,
                              ignore_index=args.ignore_index, mask_field=args.mask_field, mask_column=args.mask_column)
            print(table(scores, lowest=args.lowest))
            target = args.json or f"{args.labels.rstrip('/')}/_evaluation.json"
            with fsspec.open(target, "w", **args.storage_options) as file:
                json.dump(report(scores), file, indent=2)
            print(f"scores written to {target}")
        elif args.command == "export":
            print(export(args.output, args.format, to=args.to, classes=args.classes, min_area=args.min_area,
                         storage_options=args.storage_options))
        elif args.command == "review":
            print(review(args.output, sample=args.sample, lowest=args.lowest, class_name=args.class_name, to=args.to,
                         storage_options=args.storage_options))
        elif args.command == "train":
            print(train(args.config, tuple(args.overrides)))
        elif args.command == "select-prompts":
            print(select_prompts(args.pool, checkpoint=args.checkpoint, classes=args.classes, k=args.k, to=args.to,
                                 val_fraction=args.val_fraction, candidates=args.candidates,
                                 random_draws=args.random_draws, seed=args.seed, format=args.format,
                                 embedding=args.embedding, actors=args.actors, storage_options=args.storage_options))
        elif args.command == "tune":
            print(tune(args.config, tuple(args.overrides)))
        elif args.dry_run:
            print(json.dumps(dry_run(args.config, tuple(args.overrides)), indent=2, default=str))
        else:
            print(autolabel(args.config, tuple(args.overrides)))
    except _REFUSALS as error:
        print(f"seggpt-autolabel: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        failure = storage_failure(error)
        if failure is None:
            raise
        print(f"seggpt-autolabel: error: {failure}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
