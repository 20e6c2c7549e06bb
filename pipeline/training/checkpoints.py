"""Training checkpoints and the training log, read and written where the run is (`train` and `tune` use them)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import ray.train
import torch

TRAINER_FILE = "trainer.pt"
LOG_FILE = "train_log.jsonl"


class IntervalReport:
    """The loss log of a Ray Train worker: every `every` steps (and at the last), the interval's mean loss and
    samples/s go to `records` (the log its checkpoints keep), to Ray Train, and on rank 0 to stdout."""

    def __init__(
        self, title: str, steps: int, every: int, samples_per_step: int, rank: int, records: list[dict[str, Any]]
    ) -> None:
        self.title, self.steps, self.every, self.samples_per_step, self.rank = (
            title,
            steps,
            every,
            samples_per_step,
            rank,
        )
        self.records, self.losses = records, []
        self.started = self.interval_start = time.monotonic()

    def add(self, done: int, loss: float, **metrics: Any) -> None:
        """Count the loss of step `done` (1-based); end the interval there if it is due, with `metrics` added."""
        self.losses.append(loss)
        if done % self.every and done != self.steps:
            return
        now = time.monotonic()
        record = {
            "step": done,
            "loss": float(np.mean(self.losses)),
            **metrics,
            "samples_per_second": len(self.losses) * self.samples_per_step / (now - self.interval_start),
            "seconds": now - self.started,
        }
        self.records.append(record)
        if self.rank == 0:
            lr = f"  lr {record['lr']:.2e}" if "lr" in record else ""
            print(
                f"{self.title} {done}/{self.steps}  loss {record['loss']:.4f}{lr}  "
                f"{record['samples_per_second']:.1f} samples/s",
                flush=True,
            )
        ray.train.report(record)
        self.losses, self.interval_start = [], time.monotonic()


def complete_checkpoints(output_uri: str, storage_options: dict[str, Any]) -> list[tuple[str, int]]:
    """(URI, step) of every complete checkpoint under `output_uri`, oldest first."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    steps = sorted(
        (int(name.rpartition("-")[2]), name)
        for name in (path.rstrip("/").rpartition("/")[2] for path in fs.ls(root, detail=False))
        if name.startswith("checkpoint-") and fs.exists(f"{root}/{name}/{TRAINER_FILE}")
    )
    return [(fs.unstrip_protocol(f"{root}/{name}"), step) for step, name in steps]


def latest_checkpoint(output_uri: str, storage_options: dict[str, Any]) -> tuple[str, int] | None:
    """(URI, step) of the newest complete checkpoint under `output_uri`, or None."""
    checkpoints = complete_checkpoints(output_uri, storage_options)
    return checkpoints[-1] if checkpoints else None


def read_log(output_uri: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of `train_log.jsonl` under `output_uri` (empty when there is none)."""
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    try:
        return [json.loads(line) for line in fs.cat_file(f"{root}/{LOG_FILE}").decode().splitlines() if line]
    except FileNotFoundError:
        return []


def write_checkpoint(
    output_uri: str,
    storage_options: dict[str, Any],
    step: int,
    write: Callable[[str], None],
    optimizer: torch.optim.Optimizer,
    records: list[dict],
) -> None:
    """`checkpoint-<step>/` under `output_uri`: `write(its URI)` writes what is trained, then the log and, last (it
    marks the checkpoint complete), `trainer.pt` with the optimizer's state, the step and the log's records."""
    uri = f"{output_uri.rstrip('/')}/checkpoint-{step:07d}"
    write(uri)
    fs, root = fsspec.core.url_to_fs(output_uri, **storage_options)
    fs.pipe_file(f"{root}/{LOG_FILE}", "".join(json.dumps(record) + "\n" for record in records).encode())
    state = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "records": records}, state)
    fs.pipe_file(f"{root}/checkpoint-{step:07d}/{TRAINER_FILE}", state.getvalue())


def read_trainer_state(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(f"{uri}/{TRAINER_FILE}", **storage_options)
    return torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
