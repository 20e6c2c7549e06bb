"""`python -m jobs.benchmark WHAT ...`: a subcommand per benchmark module, in this order."""

from __future__ import annotations

import argparse

import jobs.benchmark
from jobs.benchmark import cpu_stages, export, heldout, model, pipeline, plan, prompts, scale, selection

BENCHMARKS = (model, pipeline, scale, cpu_stages, plan, heldout, prompts, selection, export)


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line) and run the benchmark it names."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=jobs.benchmark.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    for benchmark in BENCHMARKS:
        benchmark.add_arguments(sub)
    args = parser.parse_args(argv)
    vars(args).pop("run")(args)  # the record (`vars(args)`) names the benchmark (`what`), not its function


if __name__ == "__main__":
    main()
