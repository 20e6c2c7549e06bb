"""`seggpt-autolabel`: run the auto-labelling job from a YAML config, train, evaluate, export, review, choose or tune
prompts, or run the bundled demo.

    seggpt-autolabel run CONFIG.yaml [--set section.key=value ...] [--dry-run]
    seggpt-autolabel train CONFIG.yaml [--set section.key=value ...]
    seggpt-autolabel evaluate OUTPUT_URI --truth URI [--ignore-index 255|none] [--lowest N] [--json URI]
    seggpt-autolabel export OUTPUT_URI --format coco|yolo-seg|masks|label-studio [--to URI] [--classes a,b]
        [--min-area PX] [--names stem|key] [--images copy|link] [--val-fraction F] [--seed N] [--lowest N]
        [--class NAME] [--local-files-root DIR]
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec

from model import CheckpointError
from pipeline.config import ConfigError
from pipeline.labelling import autolabel, dry_run
from pipeline.prompts import PromptSetError, SelectionError, select_prompts, tune
from pipeline.results import FORMATS, IMAGES, NAMES, ExportError, ReviewError, evaluate, export, report, review, table
from pipeline.storage.listing import InputError
from pipeline.storage.output import OutputError
from pipeline.storage.retry import storage_failure
from pipeline.training import train

PROG = "seggpt-autolabel"
DEMO = Path(__file__).parent / "demo"
# What each command checks before any work: exit 2. Nothing raised once the work has started is among them (a file
# gone mid-run is an error row, or exit 1 with its traceback).
_REFUSALS = (
    ConfigError,
    PromptSetError,
    CheckpointError,
    InputError,
    OutputError,
    ExportError,
    ReviewError,
    SelectionError,
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, what adds its arguments to its parser, and what runs it on the parsed ones."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


# --- argument types and shared arguments --------------------------------------------------------------------------


def _ignore_index(text: str) -> int | None:
    """`--ignore-index`: a label value, or `none`."""
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a label value (0..65535) or none, got {text!r}")
    return int(text)


def _names(text: str) -> list[str]:
    """A comma-separated list of names, as `--classes` takes them."""
    return text.split(",")


def _add_config(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The YAML config and its `--set` overrides (`run`, `train`, `tune`)."""
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def _add_storage_options(parser: argparse.ArgumentParser, options_help: str) -> None:
    parser.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON", help=options_help)


# --- run, train, tune: a YAML config ------------------------------------------------------------------------------


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config(parser, "path of the job's YAML config")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, prompt set and checkpoint and count the inputs; label nothing",
    )


def _run(args: argparse.Namespace) -> None:
    if args.dry_run:
        print(json.dumps(dry_run(args.config, tuple(args.overrides)), indent=2, default=str))
    else:
        print(autolabel(args.config, tuple(args.overrides)))


def _train(args: argparse.Namespace) -> None:
    print(train(args.config, tuple(args.overrides)))


def _tune(args: argparse.Namespace) -> None:
    print(tune(args.config, tuple(args.overrides)))


# --- evaluate, export, review: a job's output ---------------------------------------------------------------------


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT_URI", help="the job's output (its labels/)")
    parser.add_argument(
        "--truth",
        required=True,
        metavar="URI",
        help="label maps keyed like the inputs: NAME.png / NAME.mask.png beside the images, KEY.png, "
        "WebDataset or Parquet shards with masks",
    )
    parser.add_argument(
        "--ignore-index",
        type=_ignore_index,
        default=255,
        metavar="ID|none",
        help="truth pixels with this value count nowhere (default 255; none: every id is a class)",
    )
    parser.add_argument("--lowest", type=int, default=5, metavar="N", help="list the N lowest-scoring images")
    parser.add_argument("--mask-field", default="seg.png", help="the mask member of WebDataset truth samples")
    parser.add_argument("--mask-column", default="mask", help="the mask column of Parquet truth shards")
    parser.add_argument("--json", metavar="URI", help="where to write the scores (default OUTPUT_URI/_evaluation.json)")
    _add_storage_options(parser, 'fsspec options for both URIs, e.g. \'{"client_kwargs": {"endpoint_url": ...}}\'')


def _evaluate(args: argparse.Namespace) -> None:
    scores = evaluate(
        args.output,
        args.truth,
        storage_options=args.storage_options,
        ignore_index=args.ignore_index,
        mask_field=args.mask_field,
        mask_column=args.mask_column,
    )
    print(table(scores, lowest=args.lowest))
    target = args.json or f"{args.output.rstrip('/')}/_evaluation.json"
    with fsspec.open(target, "w", **args.storage_options) as file:
        json.dump(report(scores), file, indent=2)
    print(f"scores written to {target}")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT_URI", help="the job's output")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--to", metavar="URI", help="where to write (default OUTPUT_URI/export/FORMAT)")
    parser.add_argument(
        "--classes", type=_names, metavar="A,B", help="only these classes (the others become background)"
    )
    parser.add_argument("--min-area", type=int, default=0, metavar="PX", help="drop regions smaller than this")
    parser.add_argument(
        "--names",
        choices=NAMES,
        default="stem",
        help="yolo-seg, masks: name files by the key without its extension (default), or by the whole key",
    )
    parser.add_argument(
        "--images", choices=IMAGES, default="copy", help="yolo-seg: copy the images (default), or link local ones"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.0, metavar="F", help="yolo-seg: about this share of keys to val/"
    )
    parser.add_argument("--seed", type=int, default=0, help="yolo-seg: the seed of the train/val split")
    parser.add_argument("--lowest", type=int, metavar="N", help="only the N lowest-scoring ok images")
    parser.add_argument("--class", dest="class_name", metavar="NAME", help="with --lowest: by this class's score")
    parser.add_argument(
        "--local-files-root",
        metavar="DIR",
        help="label-studio: Label Studio's LOCAL_FILES_DOCUMENT_ROOT; local images get local-files URLs under it",
    )
    _add_storage_options(parser, "fsspec options for both URIs")


def _export(args: argparse.Namespace) -> None:
    print(
        export(
            args.output,
            args.format,
            to=args.to,
            classes=args.classes,
            min_area=args.min_area,
            names=args.names,
            images=args.images,
            val_fraction=args.val_fraction,
            seed=args.seed,
            lowest=args.lowest,
            class_name=args.class_name,
            local_files_root=args.local_files_root,
            storage_options=args.storage_options,
        )
    )


def _review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT_URI", help="the job's output")
    parser.add_argument("--sample", type=int, metavar="N", help="picture N random ok images (default 100)")
    parser.add_argument("--lowest", type=int, metavar="N", help="picture the N lowest-scoring ok images")
    parser.add_argument(
        "--class", dest="class_name", metavar="NAME", help="only images with this class; --lowest by this class's score"
    )
    parser.add_argument("--to", metavar="URI", help="where to write (default OUTPUT_URI/review)")
    _add_storage_options(parser, "fsspec options for the output, the sources and --to")


def _review(args: argparse.Namespace) -> None:
    print(
        review(
            args.output,
            sample=args.sample,
            lowest=args.lowest,
            class_name=args.class_name,
            to=args.to,
            storage_options=args.storage_options,
        )
    )


# --- select-prompts: a labelled pool ------------------------------------------------------------------------------


def _select_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", metavar="POOL_URI", help="labelled images: image + NAME.png masks, tar or Parquet")
    parser.add_argument("--checkpoint", required=True, metavar="URI", help="the model that will label with them")
    parser.add_argument(
        "--k",
        type=int,
        required=True,
        help="the most prompts to choose (fewer where more do not score measurably better)",
    )
    parser.add_argument(
        "--classes", required=True, type=_names, metavar="A,B", help="names of class ids 1, 2, ... of the pool's masks"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="held out to score on (default 0.3 of the pool, at most about 300 images)",
    )
    parser.add_argument("--candidates", type=int, default=32, metavar="N", help="training images to choose from")
    parser.add_argument("--random-draws", type=int, default=5, metavar="N", help="random K-sets to compare with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actors", type=int, default=1, help="scoring actors (each takes a GPU where there are)")
    parser.add_argument("--format", default="auto", choices=("auto", "images", "webdataset", "parquet"))
    parser.add_argument("--embedding", default="semantic", choices=("semantic", "instance"))
    parser.add_argument(
        "--to",
        default="selected-prompts",
        metavar="URI",
        help="the prompt folder to write (default ./selected-prompts)",
    )
    _add_storage_options(parser, "fsspec options for the pool, the checkpoint and --to")


def _select(args: argparse.Namespace) -> None:
    print(
        select_prompts(
            args.pool,
            checkpoint=args.checkpoint,
            classes=tuple(args.classes),
            k=args.k,
            to=args.to,
            val_fraction=args.val_fraction,
            candidates=args.candidates,
            random_draws=args.random_draws,
            seed=args.seed,
            format=args.format,
            embedding=args.embedding,
            actors=args.actors,
            storage_options=args.storage_options,
        )
    )


# --- demo: the bundled sample -------------------------------------------------------------------------------------


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
    print(
        f"look at: {page.page} (a page of {len(page.overlays)} overlays, lowest score first), "
        f"{summary.output_uri}/masks/*.png (indexed PNGs), {summary.output_uri}/labels/ (Parquet rows), "
        f"{summary.output_uri}/_job.json"
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="seggpt-demo-output")


# --- the table and its dispatch -----------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "run": Command("run the job described by a YAML config", _run_arguments, _run),
    "train": Command(
        "in-context training on Ray Train, from a YAML config",
        lambda parser: _add_config(parser, "path of the training's YAML config"),
        _train,
    ),
    "evaluate": Command("score a job's output against ground-truth label maps", _evaluate_arguments, _evaluate),
    "export": Command("write a job's labels as COCO, YOLO segmentation or label-map PNGs", _export_arguments, _export),
    "review": Command("overlay pictures and a static page of a job's labels", _review_arguments, _review),
    "select-prompts": Command(
        "choose K prompts from a labelled pool by validation mean IoU", _select_arguments, _select
    ),
    "tune": Command(
        "in-context tuning of one prompt (model frozen) on Ray Train",
        lambda parser: _add_config(parser, "path of the tuning's YAML config"),
        _tune,
    ),
    "demo": Command(
        "label the bundled sample into ./seggpt-demo-output", _demo_arguments, lambda args: demo(args.output)
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in `COMMANDS`, in its order."""
    parser = argparse.ArgumentParser(prog=PROG, description="Auto-label images with SegGPT on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status: 0 done, 2 refused before any work, 3 storage unreachable (1: traceback)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except _REFUSALS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        failure = storage_failure(error)
        if failure is None:
            raise
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
