"""How the model actors run: `auto` in compute.gpus_per_actor, model.dtype and model.attention settled against the
Ray cluster the job joins or starts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from model import auto_attention
from pipeline.labelling.config import ComputeConfig, JobConfig

_GPU_POLL_S = 0.5  # how often a wait for a GPU node looks at the cluster


@dataclass(frozen=True)
class Compute:
    """How the model actors run, `auto` settled against the cluster (`resolve_compute`), and why."""

    gpus_per_actor: float
    dtype: str
    attention: str
    reason: str

    def __str__(self) -> str:
        gpus = f"{self.gpus_per_actor:g} GPU per model actor" if self.gpus_per_actor else "no GPU (CPU model actors)"
        return f"{gpus}, {self.dtype}, {self.attention} attention: {self.reason}"


def init_ray() -> None:
    """Join the cluster RAY_ADDRESS names or a running one, or start one here; once per process."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)  # RAY_ADDRESS, a running cluster, or a new one


def resolve_compute(config: JobConfig, log: Callable[[str], None] = print) -> Compute:
    """Settle `auto` in compute.gpus_per_actor, model.dtype and model.attention against the cluster (joined or
    started here): one GPU per model actor and bfloat16 where the cluster has GPUs, where its autoscaler has GPU node
    types, or where a GPU node joins within compute.gpu_wait_s (`log` says it waits); else the CPU and float32. The
    attention is the model's `auto_attention` for that device and dtype."""
    init_ray()
    gpus, reason = _gpus_per_actor(config.compute, log)
    dtype = config.model.dtype if config.model.dtype != "auto" else ("bfloat16" if gpus else "float32")
    # The model's own `auto`, settled here so that the rows can say it.
    attention = (
        config.model.attention
        if config.model.attention != "auto"
        else auto_attention("cuda" if gpus else "cpu", getattr(torch, dtype))
    )
    return Compute(gpus, dtype, attention, reason)


def _gpus_per_actor(compute: ComputeConfig, log: Callable[[str], None]) -> tuple[float, str]:
    """compute.gpus_per_actor with `auto` settled, and why."""
    if compute.gpus_per_actor != "auto":
        return float(compute.gpus_per_actor), "compute.gpus_per_actor is set"
    if gpus := ray.cluster_resources().get("GPU", 0):
        return 1.0, f"the cluster has GPUs ({gpus:g})"
    if node_types := _gpu_node_types():
        return 1.0, (
            f"the cluster has no GPU yet, and its autoscaler has GPU node types ({', '.join(node_types)}): "
            f"the model actors' demand starts them"
        )
    if compute.gpu_wait_s:
        log(f"compute: waiting up to {compute.gpu_wait_s:g} s for a GPU node to join (compute.gpu_wait_s)")
        start = time.monotonic()
        while time.monotonic() - start < compute.gpu_wait_s:
            time.sleep(min(_GPU_POLL_S, max(0.0, start + compute.gpu_wait_s - time.monotonic())))
            if ray.cluster_resources().get("GPU", 0):
                return 1.0, f"a GPU node joined after {time.monotonic() - start:.1f} s"
    return 0.0, (
        f"the cluster has no GPUs, its autoscaler reports no GPU node types, and none joined within "
        f"compute.gpu_wait_s ({compute.gpu_wait_s:g} s)"
    )


def _gpu_node_types() -> list[str]:
    """The node types with GPUs that the cluster's autoscaler can start, as it reports them to Ray (the autoscaling
    cluster config that Ray Data and Ray Train read too; Ray's own launcher and KubeRay do not report one as of Ray
    2.60, so there the config sets compute.gpus_per_actor)."""
    from ray._private.state import state

    config = state.get_cluster_config()
    groups = config.node_group_configs if config else []
    return [group.name for group in groups if group.resources.get("GPU", 0) > 0 and group.max_count != 0]
