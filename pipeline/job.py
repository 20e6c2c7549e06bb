"""The auto-labelling job: read → preprocess → infer → postprocess → write, on Ray Data.

Everything that can be checked without Ray (config, prompt set, checkpoint config) is checked first, in `plan`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow.compute as pc
import ray
import ray.data

from model import SegGptConfig, check_checkpoint, load_model
from pipeline.config import JobConfig, load_config
from pipeline.infer import SegGptPredictor
from pipeline.postprocess import postprocess
from pipeline.preprocess import preprocess
from pipeline.prompts import PromptSet, load_prompt_set
from pipeline.read import count_inputs, read_inputs
from pipeline.write import LabelWriter, clean_labels, prepare_output, write_job_files

_CPU_STAGE_CPUS = 0.25  # preprocess, postprocess and write tasks: light, so that they never starve the model


@dataclass(frozen=True)
class Plan:
    """A checked job: the config, the prompt set and the model's config, ready to run."""

    config: JobConfig
    prompts: PromptSet
    model_config: SegGptConfig
    model_fingerprint: str


@dataclass
class Summary:
    ok: int = 0
    error: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output_uri: str = ""

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.error) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"labelled {self.ok} ok, {self.error} error, {self.skipped} skipped (done before) in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s); output: {self.output_uri}"
        )


def plan(config: JobConfig | dict | str | os.PathLike, overrides: tuple[str, ...] = ()) -> Plan:
    """Validate the config, the checkpoint (names and shapes of its weights) and the prompt set. No Ray work."""
    if not isinstance(config, JobConfig):
        config = load_config(config, overrides)
    options = config.storage_options
    model_config = check_checkpoint(config.model.checkpoint, storage_options=options)
    prompts = load_prompt_set(
        config.prompts.uri,
        classes=config.prompts.classes,
        mask_format=config.prompts.mask_format,
        embedding=config.prompts.embedding,
        size=model_config.input_size,
        storage_options=options,
    )
    return Plan(config, prompts, model_config, _fingerprint(config.model.checkpoint, model_config, options))


def build_dataset(job: Plan, *, skip_keys: set[str] = frozenset()) -> ray.data.Dataset:
    """The lazy dataset of result rows (one per input image not in `skip_keys`), without writing anything."""
    config = job.config
    _init_ray()
    gpus, dtype = _resolve_compute(config)
    ds = read_inputs(config.input, config.storage_options, skip_keys=skip_keys)
    ds = ds.map_batches(
        preprocess,
        fn_kwargs={"size": job.model_config.input_size, "exif_transpose": config.input.exif_transpose},
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        num_cpus=_CPU_STAGE_CPUS,
    )
    ds = ds.map_batches(
        SegGptPredictor,
        fn_constructor_args=(config.model.checkpoint, ray.put(job.prompts)),
        fn_constructor_kwargs={"dtype": dtype, "storage_options": config.storage_options},
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=config.compute.actors[0], max_size=config.compute.actors[1]),
        num_gpus=gpus,
        num_cpus=config.compute.cpus_per_actor,
    )
    return ds.map_batches(
        postprocess,
        fn_kwargs={"palette": job.prompts.palette, "model": job.model_fingerprint,
                   "prompt_set": job.prompts.fingerprint},
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        num_cpus=_CPU_STAGE_CPUS,
    )


def autolabel(
    config: JobConfig | dict | str | os.PathLike,
    overrides: tuple[str, ...] = (),
    *,
    log: Callable[[str], None] = print,
    progress_every_s: float = 30.0,
) -> Summary:
    """Run the whole job and return its summary. Starts a local Ray unless one is running or reachable.

    Off a terminal (scheduled runs), `log` gets a progress line every `progress_every_s` seconds.
    """
    job = plan(config, overrides)
    config, options = job.config, job.config.storage_options
    started = datetime.now(timezone.utc)
    summary = Summary(output_uri=config.output.uri)
    skip = prepare_output(config.output.uri, options, resume=config.output.resume)
    summary.skipped = len(skip)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    ds = build_dataset(job, skip_keys=skip).map_batches(
        LabelWriter,
        fn_constructor_args=(config.output.uri, options, config.output.png),
        batch_size=config.output.rows_per_file,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.compute.actors[1]),
        num_cpus=_CPU_STAGE_CPUS,
    )
    write_job_files(config.output.uri, options, _job_info(job, summary, started), success=False)
    start = last_report = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok = pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0
        summary.ok += ok
        summary.error += batch.num_rows - ok
        summary.seconds = time.monotonic() - start
        if not sys.stderr.isatty() and time.monotonic() - last_report >= progress_every_s:
            last_report = time.monotonic()
            log(f"progress: {summary}")
    summary.seconds = time.monotonic() - start
    clean_labels(config.output.uri, options, drop_errors=False)
    write_job_files(config.output.uri, options, _job_info(job, summary, started), success=True)
    return summary


def dry_run(config: JobConfig | dict | str | os.PathLike, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check config, prompt set and checkpoint (reading all weights) and count the inputs, without labelling."""
    job = plan(config, overrides)
    load_model(job.config.model.checkpoint, storage_options=job.config.storage_options)
    counted = count_inputs(job.config.input, job.config.storage_options)
    return {"inputs": dataclasses.asdict(counted), "prompts": list(job.prompts.names), "classes": list(job.prompts.classes)}


def _init_ray() -> None:
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)  # RAY_ADDRESS, a running cluster, or a new one


def _resolve_compute(config: JobConfig) -> tuple[float, str]:
    """(GPUs per actor, model dtype) with `auto` settled: one GPU and bfloat16 where the cluster has GPUs."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.compute.gpus_per_actor
    gpus = (1.0 if has_gpus else 0.0) if gpus == "auto" else float(gpus)
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if gpus > 0 else "float32"
    return gpus, dtype


def _fingerprint(uri: str, model_config: SegGptConfig, storage_options: dict[str, Any]) -> str:
    """Identity of a checkpoint: its URI, config, and the names, sizes and versions of its files."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    stamp = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or "")) for name, info in files.items()
    )
    text = json.dumps([uri, model_config.to_dict(), stamp], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _job_info(job: Plan, summary: Summary, started: datetime) -> dict[str, Any]:
    import numpy
    import torch

    return {
        "config": job.config.to_dict(redact=True),
        "classes": ["background", *job.prompts.classes],
        "palette": job.prompts.palette.tolist(),
        "prompts": list(job.prompts.names),
        "model_fingerprint": job.model_fingerprint,
        "prompt_set_fingerprint": job.prompts.fingerprint,
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "numpy": numpy.__version__,
                     "python": sys.version.split()[0]},
        "counts": {"ok": summary.ok, "error": summary.error, "skipped": summary.skipped},
        "started_at": started.isoformat(timespec="seconds"),
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(summary.seconds, 3),
    }
