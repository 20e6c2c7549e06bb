"""Dependencies point one way: jobs -> pipeline -> model; `model` needs neither Ray nor `transformers`."""

from __future__ import annotations

import ast
import importlib
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
    modules = imported_after("import pipeline.labelling.job")
    assert "ray" in modules and "jobs" not in modules and "transformers" not in modules


CONCERNS = ("labelling", "prompts", "training", "results")


def pipeline_imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, names) of every `from pipeline... import` and `import pipeline...` in
    pipeline/, read from the source (imports inside functions too)."""
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                found.append((module, node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, []) for alias in node.names if alias.name.startswith("pipeline")]
    return found


def test_concern_packages_meet_only_through_what_a_package_exports():
    """Inside `pipeline`, `storage` imports no other part of it, `config` no concern package, and a concern package
    takes from another only names that package's `__init__` exports (`__all__`), never from its modules."""
    crossings = []
    for importer, imported, names in pipeline_imports():
        source, target = importer.split(".")[1], imported.split(".")[1] if "." in imported else None
        if source == target:
            continue
        if source == "storage" or (source == "config" and target in CONCERNS):
            crossings.append(f"{importer} imports {imported}")
        elif source in CONCERNS and target in CONCERNS:
            exported = set(importlib.import_module(f"pipeline.{target}").__all__)
            if imported != f"pipeline.{target}" or not set(names) <= exported:
                crossings.append(f"{importer} imports {names} from {imported}")
    assert not crossings
    assert len(pipeline_imports()) > 50  # the walk did find the imports


def test_no_module_of_pipeline_or_jobs_passes_450_lines():
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for folder in ("pipeline", "jobs")
        for path in (REPO / folder).rglob("*.py")
    }
    assert len(sizes) > 20 and not {path: lines for path, lines in sizes.items() if lines > 450}
