"""The labelling job: plan the work on Ray (`work`: listing or manifest, resume index, pending work; `plan`: what
one partition of the keys leaves to do), run the stages (read, preprocess, infer, postprocess, write) on Ray Data;
its config (`config`) and the compute it settles on (`compute`)."""

import importlib
from typing import Any

# Imported when first asked for, so that the Ray workers that run the planning tasks (`work`, `plan`: Arrow only)
# do not import torch and the model with the package.
_EXPORTS = {
    "InputConfig": "config",
    "JobConfig": "config",
    "load_config": "config",
    "resolve_compute": "compute",
    "autolabel": "job",
    "dry_run": "job",
    "plan": "job",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.labelling.{_EXPORTS[name]}"), name)
