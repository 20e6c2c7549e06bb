"""`plan` times how a resumed run plans at scale, on a local Ray: it synthesises (once, reused by later runs) a
local tree of N empty `.jpg` inputs (or with `--manifest` a Parquet manifest of their keys, and no files) and an
output whose `labels/` holds R rows as the job writes them (256-row files, error rows in files of their own, a mask
of B random bytes per ok row, merged with `--file-mb`), then, in a fresh process that starts Ray, runs the planning
steps of `pipeline.labelling.job.autolabel` (the inputs: listing, or the manifest's pieces; the labels files;
`plan_work`, the Ray tasks that read the manifest and the resume index and find the work) and reports the time of
each, the driver's peak and baseline RSS, the Ray workers' peaks, and the bytes that reading the index takes from
`labels/` as a share of its size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from jobs.benchmark.harness import (
    ProcessPeaks,
    finish_parser,
    peak_kib,
    rchar,
    reset_peak,
    rss_kib,
    run_child,
    start_local_ray,
    step_peak_kib,
    write_record,
)
from jobs.benchmark.plan_data import (
    PLAN_MAX_FOLDERS,
    PLAN_MODEL,
    PLAN_PROMPT_SET,
    PLAN_ROWS_PER_FILE,
    plan_expected_pending,
    synthesise_plan_data,
)
from pipeline.labelling.plan import WORK_SCHEMA

T = TypeVar("T")
MIB = 1024  # KiB


class CountingFileSystem(LocalFileSystem):
    """A local filesystem whose opened files count the bytes they return (`bytes_read`, over all threads).

    Only reads through `open` are counted (read, read1, readinto, readinto1), not listings; pass it as the `fs`
    of `pipeline.labelling.work.read_file_index` to see what the index reads from storage.
    """

    cachable = False  # a counter of its own per instance, never fsspec's shared LocalFileSystem

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.files_opened = 0

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> LocalFileOpener:
        if "r" not in mode or "+" in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        with self._lock:
            self.files_opened += 1
        return _CountingFile(self._strip_protocol(path), mode, fs=self, **kwargs)

    def count(self, size: int) -> None:
        """Add `size` bytes read."""
        with self._lock:
            self.bytes_read += size


class _CountingFile(LocalFileOpener):
    """A local file that tells its `CountingFileSystem` what each read returned."""

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data = self.f.read(*args, **kwargs)
        self.fs.count(len(data))
        return data

    def read1(self, *args: Any, **kwargs: Any) -> bytes:
        data = self.f.read1(*args, **kwargs)
        self.fs.count(len(data))
        return data

    def readinto(self, buffer: Any) -> int | None:
        size = self.f.readinto(buffer)
        self.fs.count(size or 0)
        return size

    def readinto1(self, buffer: Any) -> int | None:
        size = self.f.readinto1(buffer)
        self.fs.count(size or 0)
        return size


class _StepMeter:
    """Runs planning steps one by one and keeps each one's numbers in `steps`: seconds; RSS, the step's own peak
    RSS (KiB) and Arrow's allocation after it; bytes read through system calls during it."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = {}
        self.pool = pa.default_memory_pool()

    def __call__(self, name: str, action: Callable[[], T]) -> T:
        reset = reset_peak()
        read, start = rchar(), time.perf_counter()
        result = action()
        self.steps[name] = {
            "seconds": time.perf_counter() - start,
            "rss_kib": rss_kib(),
            "peak_rss_kib": step_peak_kib(reset),  # during this step alone, where the peak can be reset
            "arrow_bytes": self.pool.bytes_allocated(),
            "arrow_peak_bytes": self.pool.max_memory(),  # since the process started: a rise is this step's
            "rchar": rchar() - read,
        }
        return result


def plan_steps(
    inputs_uri: str, output_root: str, fs: CountingFileSystem, manifest: str | None = None
) -> tuple[dict, pa.Table]:
    """The planning of `pipeline.labelling.job.autolabel` on a resume (on_mismatch refuse), on the running Ray, step
    by step in its order: the inputs (`plan_inputs`: listing, or finding `manifest`'s pieces), the labels files, and
    `plan_work`. Then, apart from the planning: what reading the index takes from `labels/` (each file's index read
    through the counting `fs`, as the index tasks read it) and the work items.

    Returns the numbers of each step (seconds; RSS and peak RSS after it, KiB; Arrow's allocation after it), the
    Ray workers' peak RSS, and the work items.
    """
    import ray

    from pipeline.labelling import InputConfig
    from pipeline.labelling.job import plan_inputs
    from pipeline.labelling.work import RunKeys, list_labels, plan_work, read_file_index
    from pipeline.storage.retry import Retry

    step, local, retry = _StepMeter(), LocalFileSystem(), Retry(60)
    inputs = step("plan_inputs", lambda: plan_inputs(InputConfig(uri=inputs_uri, manifest=manifest), {}, retry))
    labels = step("list_labels", lambda: list_labels(local, output_root))
    run = RunKeys(PLAN_MODEL, PLAN_PROMPT_SET, inputs.config_key)
    with ProcessPeaks() as peaks:
        work = step("plan_work", lambda: plan_work(inputs, local, labels, run, {}, retry))
    steps = dict(step.steps)
    numbers = {
        "steps": steps,
        "total_seconds": sum(s["seconds"] for s in steps.values()),
        "planning_peak_rss_kib": max(s["peak_rss_kib"] for s in steps.values()),
        "worker_peak_rss_kib": {role: kib for role, kib in peaks.by_role().items() if role != "driver"},
        "partitions": work.partitions,
        "listed": work.listed,
        "index_files": len(labels),
        "foreign_groups": len(work.foreign),
        "skipped": work.skipped,
        "pending": work.pending,
        "arrow_peak_bytes": step.pool.max_memory(),
        "arrow_pool": step.pool.backend_name,
    }
    with ThreadPoolExecutor(16) as pool:
        numbers["index_rows"] = sum(pool.map(lambda path: read_file_index(fs, path).num_rows, labels))
    numbers.update(index_bytes_read=fs.bytes_read, index_files_opened=fs.files_opened)
    items = pa.concat_tables([WORK_SCHEMA.empty_table(), *ray.get(work.shards + work.loose)]).sort_by("key")
    return numbers, items


def _plan_child(inputs_uri: str, output_root: str, manifest: str | None) -> None:
    """Body of the measuring process: import what the job's driver imports and start Ray, then plan and print
    JSON."""
    import pipeline.labelling.job  # noqa: F401  (torch, Ray, pyarrow, fsspec: the driver's baseline)

    start_local_ray()
    baseline = {"rss_kib": rss_kib(), "import_peak_rss_kib": peak_kib()}
    numbers, _ = plan_steps(inputs_uri, output_root, CountingFileSystem(), manifest)
    numbers["baseline"] = baseline
    numbers["peak_rss_kib"] = peak_kib()  # ru_maxrss over the process's life: the imports' peak included
    numbers["end_rss_kib"] = rss_kib()
    print(json.dumps(numbers))


def _labels_size(labels: Path) -> tuple[int, int]:
    """The number of Parquet files in `labels` and their bytes."""
    sizes = [entry.stat().st_size for entry in os.scandir(labels) if entry.name.endswith(".parquet")]
    return len(sizes), sum(sizes)


def _evict(labels: Path) -> None:
    """Drop the labels files from the page cache (posix_fadvise DONTNEED), so that the index reads them cold."""
    for entry in os.scandir(labels):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _print_numbers(numbers: dict, labels_bytes: int, share: float, expected: int) -> None:
    """The measuring process's numbers: a table of the steps, the driver's memory, the index's reads, the plan."""
    steps, base = numbers["steps"], numbers["baseline"]
    print(f"  {'step':<16}{'seconds':>9}{'RSS after':>12}{'step peak':>12}{'Arrow after':>13}{'Arrow peak':>12}")
    for name, s in steps.items():
        print(
            f"  {name:<16}{s['seconds']:9.2f}{s['rss_kib'] / MIB:8.0f} MiB{s['peak_rss_kib'] / MIB:8.0f} MiB"
            f"{s['arrow_bytes'] / 2**20:9.0f} MiB{s['arrow_peak_bytes'] / 2**20:8.0f} MiB"
        )
    print(f"  {'total':<16}{numbers['total_seconds']:9.2f}")
    peak = numbers["planning_peak_rss_kib"]
    print(
        f"  driver RSS: baseline {base['rss_kib'] / MIB:.0f} MiB after imports (pipeline.labelling.job: torch, "
        f"Ray) and ray.init, peak while planning {peak / MIB:.0f} MiB (VmHWM), so planning added "
        f"{(peak - base['rss_kib']) / MIB:.0f} MiB; Arrow's peak allocation in the driver "
        f"{numbers['arrow_peak_bytes'] / 2**20:.0f} MiB ({numbers['arrow_pool']})"
    )
    workers = ", ".join(f"{role} {kib / MIB:.0f} MiB" for role, kib in numbers["worker_peak_rss_kib"].items())
    print(f"  Ray processes' peak RSS during plan_work ({numbers['partitions']} partitions): {workers}")
    print(
        f"  resume index: {numbers['index_rows']} rows of {numbers['index_files']} files; reading it takes "
        f"{numbers['index_bytes_read']:,} bytes (counting filesystem, measured apart) of labels/'s "
        f"{labels_bytes:,}: {share:.2%}"
    )
    print(
        f"  listed {numbers['listed']} inputs; skipped {numbers['skipped']}, pending work items "
        f"{numbers['pending']} (expected {expected})"
    )


def benchmark_plan(args: argparse.Namespace) -> None:
    """Synthesise (or reuse) the data, plan in a fresh process, print what each step took."""
    directory = Path(args.dir).resolve()
    made = synthesise_plan_data(
        directory, args.inputs, args.rows, args.mask_bytes, manifest=args.manifest, file_mb=args.file_mb
    )
    labels = directory / "out" / "labels"
    files, labels_bytes = _labels_size(labels)
    if args.cold:
        _evict(labels)
    manifest = str(directory / "manifest.parquet") if args.manifest else None
    numbers = run_child(_plan_child, str(directory / "inputs"), str(directory / "out"), manifest)
    share = numbers["index_bytes_read"] / labels_bytes if labels_bytes else 0.0
    expected = len(plan_expected_pending(args.inputs, args.rows))
    source = "a Parquet manifest" if args.manifest else f"local tree, {min(PLAN_MAX_FOLDERS, args.inputs)} folders"
    print(
        f"plan: {args.inputs} inputs ({source}), {args.rows} labelled "
        f"rows in {files} files of "
        + (f"about {args.file_mb:g} MB" if args.file_mb else f"<= {PLAN_ROWS_PER_FILE} rows")
        + f" ({args.mask_bytes} mask bytes per ok row), "
        f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs; data in {directory}"
        + (
            f" (synthesised: inputs {made['inputs_s']:.0f} s, labels {made['labels_s']:.0f} s)"
            if any(made.values())
            else " (reused)"
        )
    )
    _print_numbers(numbers, labels_bytes, share, expected)
    write_record(
        args.json,
        {
            "inputs": args.inputs,
            "rows": args.rows,
            "mask_bytes": args.mask_bytes,
            "cold": args.cold,
            "manifest": args.manifest,
            "file_mb": args.file_mb,
            "labels_files": files,
            "labels_bytes": labels_bytes,
            "index_share": share,
            "expected_pending": expected,
            "synthesis_seconds": made,
            **numbers,
        },
    )


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `plan` subcommand."""
    parser = sub.add_parser(
        "plan", help="resume planning over synthetic inputs and labels: time, memory, bytes read", description=__doc__
    )
    parser.add_argument("--inputs", type=int, default=1_000_000, help="input files to list")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in labels/ (the first keys, 1%% errors)")
    parser.add_argument("--mask-bytes", type=int, default=4000, help="mask bytes per ok row (a small PNG)")
    parser.add_argument(
        "--dir",
        default=os.path.join(tempfile.gettempdir(), "seggpt-plan-bench"),
        help="where the synthetic data is made, or reused when it is there",
    )
    parser.add_argument("--manifest", action="store_true", help="read the inputs from a manifest, list nothing")
    parser.add_argument(
        "--file-mb", type=float, default=0, help="labels files merged to about this size, as a run leaves them"
    )
    parser.add_argument("--cold", action="store_true", help="drop labels/ from the page cache before measuring")
    return finish_parser(parser, benchmark_plan)
