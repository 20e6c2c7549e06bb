"""The auto-labelling job: read → preprocess → infer → postprocess → write, on Ray Data.

Everything that can refuse a run is checked before the output is touched: config, prompt set, checkpoint and
the inputs' top level (a URI that does not exist, a manifest without its files or column; in `plan`, before Ray
starts), the output's lease and then, in `autolabel` once Ray is joined, what the planning finds on Ray
(`pipeline.labelling.work.plan_work`: duplicate keys, no inputs) and, on a resume, the model, settings and prompt
set that made the labels already there (the settings `auto` settles on depend on the cluster's GPUs: see
`pipeline.labelling.compute`).

Every storage call, here and in the job's tasks and actors, goes through one `pipeline.storage.retry.Retry` of
`storage.retry_s`; past it the job raises `StorageUnavailable` naming the URI (reads: an error row instead),
and what was written before stays valid for a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from model import SegGptConfig, check_checkpoint, load_model
from model.checkpoint import resolve_checkpoint
from model.memory import KEEP_FREED_MEMORY_ENV
from pipeline.labelling.compute import Compute, init_ray, resolve_compute
from pipeline.labelling.config import InputConfig, JobConfig, load_config
from pipeline.labelling.infer import SegGptPredictor
from pipeline.labelling.postprocess import postprocess
from pipeline.labelling.preprocess import preprocess
from pipeline.labelling.work import (
    LISTING_FOLDERS_PER_TASK,
    Inputs,
    RunKeys,
    Work,
    list_labels,
    plan_work,
    settle_labels,
)
from pipeline.labelling.write import LabelWriter
from pipeline.prompts import PromptSet, load_prompt_set
from pipeline.storage.formats import read_inputs
from pipeline.storage.lease import OutputLease
from pipeline.storage.listing import listing_pieces
from pipeline.storage.manifest import manifest_pieces
from pipeline.storage.output import RAN_COLUMNS, OutputError, prepare_output, read_job_file, write_job_files
from pipeline.storage.retry import Retry, storage_failure

# The writers wait on storage: they hold no CPU, so that they never keep a CPU task (compute.cpus_per_task) or
# the model from a node, and they are not fused with postprocess, which then scales in tasks of its own.
_WRITER_CPUS = 0.0


@dataclass(frozen=True)
class Plan:
    """A checked job: the config, the prompt set, the model's config and the listed inputs, ready to run."""

    config: JobConfig
    prompts: PromptSet
    model_config: SegGptConfig
    model_fingerprint: str  # of the checkpoint; a row's `model` is `label_fingerprint` of it and the settings
    inputs: Inputs  # listed, or a manifest's pieces: read in Ray tasks by `pipeline.labelling.work.plan_work`


@dataclass
class Summary:
    ok: int = 0
    error: int = 0
    skipped: int = 0
    added: int = 0  # keys in labels/ now that were not before the run
    partitions: int = 0  # of the planning on Ray (pipeline.labelling.work)
    seconds: float = 0.0
    output_uri: str = ""
    # what the model actors ran with, as they said: [{device, dtype, attention, images}], images labelled ok
    ran: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.error) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"labelled {self.ok} ok, {self.error} error, {self.skipped} skipped (done before) in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s); output: {self.output_uri}"
        )


def plan(config: JobConfig | dict | str | os.PathLike, overrides: tuple[str, ...] = ()) -> Plan:
    """Validate the config, the checkpoint (names and shapes of its weights) and the prompt set, and list the
    inputs' top level (or find the pieces of `input.manifest`). No Ray work, nothing written."""
    if not isinstance(config, JobConfig):
        config = load_config(config, overrides)
    options, retry, checkpoint = config.storage_options, Retry(config.storage.retry_s), config.model.checkpoint
    model_config = retry(lambda: check_checkpoint(checkpoint, storage_options=options), checkpoint)
    prompts = retry(
        lambda: load_prompt_set(
            config.prompts.uri,
            classes=config.prompts.classes,
            mask_format=config.prompts.mask_format,
            embedding=config.prompts.embedding,
            size=model_config.input_size,
            storage_options=options,
        ),
        config.prompts.uri,
    )
    inputs = plan_inputs(config.input, options, retry)
    fingerprint = retry(lambda: _fingerprint(checkpoint, model_config, options), checkpoint)
    return Plan(config, prompts, model_config, fingerprint, inputs)


def plan_inputs(input_cfg: InputConfig, storage_options: dict[str, Any], retry: Retry) -> Inputs:
    """The inputs of a run, in pieces for `plan_work`'s Ray tasks: the listing's top level (URIs that do not exist
    are refused here), or the pieces of `input.manifest`."""
    if input_cfg.manifest:
        pieces = retry(lambda: manifest_pieces(input_cfg, storage_options), input_cfg.manifest)
        return Inputs(tuple(pieces), sum(piece.rows for piece in pieces), input_cfg, "input.manifest")
    pieces = retry(
        lambda: listing_pieces(input_cfg, storage_options, LISTING_FOLDERS_PER_TASK), " ".join(input_cfg.uris)
    )
    return Inputs(tuple(pieces), None, input_cfg, input_cfg.config_key)


def build_dataset(job: Plan, work: Work | None = None, compute: Compute | None = None) -> ray.data.Dataset:
    """The lazy dataset of result rows, one per image of `work` (default: every input), without writing anything.

    `work` is what `pipeline.labelling.work.plan_work` planned; `compute` (default: settled here, see
    `resolve_compute`) how the model actors run.
    """
    config, retry = job.config, Retry(job.config.storage.retry_s)
    compute = compute or resolve_compute(config)
    work = work or _plan(job, compute, None, {})
    ds = read_inputs(
        work.shards,
        work.loose,
        image_column=config.input.image_column,
        storage_options=config.storage_options,
        retry=retry,
    )
    # Preprocess runs in tasks of its own, as many as the CPUs allow (never fused into the model's actors, whose
    # runtime environment differs).
    ds = ds.map_batches(
        preprocess,
        fn_kwargs={
            "size": job.model_config.input_size,
            "exif_transpose": config.input.exif_transpose,
            "jpeg_draft": config.input.jpeg_draft,
            "max_pixels": config.input.max_pixels,
        },
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        num_cpus=config.compute.cpus_per_task,
    )
    ds = ds.map_batches(
        SegGptPredictor,
        fn_constructor_args=(config.model.checkpoint, job.prompts),  # by value: see SegGptPredictor
        fn_constructor_kwargs={
            "dtype": compute.dtype,
            "attention": compute.attention,
            "storage_options": config.storage_options,
            "retry": retry,
        },
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=config.compute.actors[0], max_size=config.compute.actors[1]),
        num_gpus=compute.gpus_per_actor,
        num_cpus=config.compute.cpus_per_actor,
        # The model runs on the actor's task thread; this environment keeps its freed tensors for reuse there
        # (model/memory.py). Without it each batch of 4 at ViT-L width, 2 layers, faulted in ~5 GB of fresh pages.
        runtime_env={"env_vars": KEEP_FREED_MEMORY_ENV},
    )
    return ds.map_batches(
        postprocess,
        fn_kwargs={
            "palette": job.prompts.palette,
            "model": label_fingerprint(job, compute),
            "prompt_set": job.prompts.fingerprint,
        },
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        num_cpus=config.compute.cpus_per_task,
    )


def autolabel(
    config: JobConfig | dict | str | os.PathLike,
    overrides: tuple[str, ...] = (),
    *,
    log: Callable[[str], None] = print,
    progress_every_s: float = 30.0,
) -> Summary:
    """Run the whole job and return its summary. Starts a local Ray unless one is running or reachable.

    `log` gets what `auto` settled on and why (`resolve_compute`) and, off a terminal (scheduled runs), a progress
    line every `progress_every_s` seconds.
    Raises `OutputError` (with the output untouched) when another run holds the output (before Ray starts) or, on a
    resume with `output.on_mismatch: refuse`, when its labels were made by another model, other settings or another
    prompt set (before any Ray work).
    Raises `pipeline.storage.retry.StorageUnavailable` when storage failed for longer than `storage.retry_s`.
    """
    job = plan(config, overrides)
    config, options, output = job.config, job.config.storage_options, job.config.output
    prompt_set, retry = job.prompts.fingerprint, Retry(config.storage.retry_s)
    fs, root = fsspec.core.url_to_fs(output.uri, **options)
    started = datetime.now(timezone.utc)
    summary = Summary(output_uri=output.uri)
    with OutputLease(fs, root, output.uri, retry=retry) as lease:  # its `retry` writes only while it is held
        runs = retry(lambda: read_job_file(fs, root), output.uri).get("runs", [])
        before = retry(lambda: list_labels(fs, root), output.uri) if output.resume else {}
        compute = resolve_compute(config, log)
        model = label_fingerprint(job, compute)
        work = _plan(job, compute, fs, before)
        if output.on_mismatch == "refuse":
            _refuse_foreign_labels(work.foreign, model, prompt_set, output.uri, _made_with(job, compute, runs))
        summary.skipped, summary.partitions = work.skipped, work.partitions
        lease.retry(lambda: prepare_output(fs, root, resume=output.resume), output.uri)
        log(
            f"planned: {work.listed} input files, {summary.skipped} images done before, "
            f"{work.pending} files or shards to read"
        )
        log(f"compute: {compute}")

        _set_data_context()
        ds = build_dataset(job, work, compute).map_batches(
            LabelWriter,
            fn_constructor_args=(output.uri, options, output.png, lease.retry),
            batch_size=output.rows_per_file,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.compute.actors[1]),
            num_cpus=_WRITER_CPUS,
        )
        info = _job_info(job, compute, summary, started, runs, completed=False)
        lease.retry(lambda: write_job_files(output.uri, options, info, success=False), output.uri)
        _drain(ds, summary, log, progress_every_s)
        _, summary.added = settle_labels(
            fs, root, before, _run_keys(job, compute), work.partitions, int(output.file_mb * 2**20), lease.retry
        )
        info = _job_info(job, compute, summary, started, runs, completed=True)
        lease.retry(lambda: write_job_files(output.uri, options, info, success=True), output.uri)
    return summary


def _set_data_context() -> None:
    """Ray Data's settings for the run. Faults: Ray Data restarts a dead actor and retries its tasks without limit,
    and retries a task whose worker died (its defaults, kept). Errors inside a task are rows (bad images) or
    StorageUnavailable (past storage.retry_s): a block that still fails stops the run, never drops its images
    quietly."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.max_errored_blocks = 0
    context.raise_original_map_exception = True  # so that a StorageUnavailable reaches us whole (exit 3)


def _drain(ds: ray.data.Dataset, summary: Summary, log: Callable[[str], None], progress_every_s: float) -> None:
    """Run the dataset to its end, counting the written rows into `summary`; off a terminal, log progress every
    `progress_every_s` seconds. A storage failure in a task or actor, wrapped by Ray, is raised as itself."""
    start = last_report = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ok = pc.sum(batch["ok"]).as_py() or 0
            summary.ok += ok
            summary.error += (pc.sum(batch["rows"]).as_py() or 0) - ok
            _count_ran(summary.ran, batch)
            summary.seconds = time.monotonic() - start
            if not sys.stderr.isatty() and time.monotonic() - last_report >= progress_every_s:
                last_report = time.monotonic()
                log(f"progress: {summary}")
    except Exception as error:
        failure = storage_failure(error)
        if failure is None:
            raise
        raise failure from None
    summary.seconds = time.monotonic() - start


def _run_keys(job: Plan, compute: Compute) -> RunKeys:
    return RunKeys(label_fingerprint(job, compute), job.prompts.fingerprint, job.inputs.config_key)


def _plan(job: Plan, compute: Compute, fs: fsspec.AbstractFileSystem | None, labels: dict[str, int]) -> Work:
    """`plan_work` for `job` run with `compute`, given the output's `labels` files on `fs`."""
    options, retry = job.config.storage_options, Retry(job.config.storage.retry_s)
    return plan_work(job.inputs, fs, labels, _run_keys(job, compute), options, retry)


def _refuse_foreign_labels(
    foreign: list[dict], model: str, prompt_set: str, uri: str, made_with: dict[str, str]
) -> None:
    """Raise `OutputError` when there are `foreign` labels (`Work.foreign`: ok rows of another model or prompt set);
    `made_with` (`_made_with`) says what each known model fingerprint stands for."""
    if foreign:
        top = foreign[0]
        more = f" (and {len(foreign) - 1} other model/prompt-set pairs)" if len(foreign) > 1 else ""
        unknown = "labelled before the settings were part of the model fingerprint, or by another output's run"
        models = (
            f" (model {top['model']}: {made_with.get(top['model'], unknown)}; model {model}: {made_with[model]})"
            if top["model"] != model
            else ""
        )
        raise OutputError(
            f"output.uri {uri}: {top['rows']} labels there were made by model {top['model']} with prompt set "
            f"{top['prompt_set']}{more}, this run has model {model} with prompt set {prompt_set}{models}; set "
            f"output.on_mismatch=relabel to relabel them, or output.resume=false to start over"
        )


def _made_with(job: Plan, compute: Compute, runs: list[dict[str, Any]]) -> dict[str, str]:
    """What each model fingerprint of this run and of the output's earlier runs stands for: checkpoint and settings."""
    made = [
        (run["model_fingerprint"], run["checkpoint_fingerprint"], run["settings"]) for run in runs if "settings" in run
    ]
    made.append((label_fingerprint(job, compute), job.model_fingerprint, label_settings(job.config, compute)))
    return {model: f"checkpoint {checkpoint}, {_settings_text(settings)}" for model, checkpoint, settings in made}


def _settings_text(settings: dict[str, Any]) -> str:
    """`label_settings` as `attention=sdpa dtype=float32 exif_transpose=true jpeg_draft=false`."""
    return " ".join(f"{key}={str(value).lower()}" for key, value in sorted(settings.items()))


def dry_run(config: JobConfig | dict | str | os.PathLike, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check config, prompt set and checkpoint (reading all weights) and count the inputs, without labelling."""
    job = plan(config, overrides)
    checkpoint, options, retry = (
        job.config.model.checkpoint,
        job.config.storage_options,
        Retry(job.config.storage.retry_s),
    )
    retry(lambda: load_model(checkpoint, storage_options=options), checkpoint)
    init_ray()
    keys = RunKeys("", "", job.inputs.config_key, count=(job.config.input.image_column, options, retry))
    work = plan_work(job.inputs, None, {}, keys, options, retry)
    return {
        "inputs": dataclasses.asdict(work.counted),
        "prompts": list(job.prompts.names),
        "classes": list(job.prompts.classes),
    }


def label_settings(config: JobConfig, compute: Compute) -> dict[str, Any]:
    """The settings that change a label's pixels, as this run makes them."""
    return {
        "dtype": compute.dtype,
        "attention": compute.attention,
        "exif_transpose": config.input.exif_transpose,
        "jpeg_draft": config.input.jpeg_draft,
    }


def label_fingerprint(job: Plan, compute: Compute) -> str:
    """A row's `model`: what made the label, the checkpoint (`Plan.model_fingerprint`) and `label_settings`."""
    text = json.dumps([job.model_fingerprint, label_settings(job.config, compute)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _count_ran(ran: list[dict[str, Any]], written: pa.RecordBatch | pa.Table) -> None:
    """Add the ok images of the writer's `written` rows to `ran` ([{device, dtype, attention, images}])."""
    for row in written.to_pylist():
        said = {name.removeprefix("ran_"): row[name] for name in RAN_COLUMNS}
        if row["ok"] and said["device"] is not None:
            entry = next((entry for entry in ran if all(entry[key] == value for key, value in said.items())), None)
            if entry is None:
                entry = {**said, "images": 0}
                ran.append(entry)
            entry["images"] += row["ok"]


def _fingerprint(uri: str, model_config: SegGptConfig, storage_options: dict[str, Any]) -> str:
    """Identity of a checkpoint: its URI, config, and the names, sizes and versions of its files (of a hub id: its
    snapshot's, whose folder is named by the commit)."""
    fs, path = fsspec.core.url_to_fs(resolve_checkpoint(uri), **storage_options)
    files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    stamp = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or "")) for name, info in files.items()
    )
    text = json.dumps([uri, model_config.to_dict(), stamp], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _job_info(
    job: Plan, compute: Compute, summary: Summary, started: datetime, runs: list[dict[str, Any]], *, completed: bool
) -> dict[str, Any]:
    """`_job.json`: this run's config, classes, fingerprints, compute (what `auto` settled on and why), settings,
    what the model actors ran with and counts, and `runs`, the history of every run."""
    import numpy
    import torch

    run = {
        "started_at": started.isoformat(timespec="seconds"),
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(summary.seconds, 3),
        "model_fingerprint": label_fingerprint(job, compute),  # the rows' `model`
        "checkpoint_fingerprint": job.model_fingerprint,
        "settings": label_settings(job.config, compute),
        "prompt_set_fingerprint": job.prompts.fingerprint,
        "compute": dataclasses.asdict(compute),
        "ran": sorted(summary.ran, key=lambda entry: -entry["images"]),
        "resume": job.config.output.resume,
        "completed": completed,
        "counts": {"ok": summary.ok, "error": summary.error, "skipped": summary.skipped, "added": summary.added},
    }
    return {
        "config": job.config.to_dict(redact=True),
        "classes": ["background", *job.prompts.classes],
        "palette": job.prompts.palette.tolist(),
        "prompts": list(job.prompts.names),
        "prompt_kinds": dict(zip(job.prompts.names, job.prompts.kinds)),  # "pair" or "tuned" (a tuned prompt file)
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "numpy": numpy.__version__,
            "python": sys.version.split()[0],
        },
        **run,
        "runs": [*runs, run],
    }
