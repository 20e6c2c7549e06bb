"""Dependencies point one way: jobs -> pipeline -> model; `model` needs neither Ray nor `transformers`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_model_imports_neither_ray_nor_transformers():
    modules = imported_after("import model, model.processing")
    assert not modules & {"ray", "transformers", "pipeline", "jobs"}


def test_pipeline_does_not_import_jobs():
    modules = imported_after("import pipeline.job")
    assert "ray" in modules and "jobs" not in modules and "transformers" not in modules
