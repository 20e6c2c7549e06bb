"""The labelling job: plan the work on Ray (`work`: listing or manifest, resume index, pending work; `plan`: what
one partition of the keys leaves to do), run the stages (read, preprocess, infer, postprocess, write) on Ray Data;
its config (`config`) and the compute it settles on (`compute`)."""

from pipeline.labelling.compute import resolve_compute
from pipeline.labelling.config import InputConfig, JobConfig, load_config
from pipeline.labelling.job import autolabel, dry_run, plan

__all__ = ["InputConfig", "JobConfig", "autolabel", "dry_run", "load_config", "plan", "resolve_compute"]
