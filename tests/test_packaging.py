"""pyproject.toml as setuptools reads it on every install: no deprecation, and a build requirement that supports it."""

from __future__ import annotations

import warnings
from pathlib import Path

from packaging.requirements import Requirement
from setuptools.config.pyprojecttoml import apply_configuration, load_file
from setuptools.dist import Distribution

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
FIRST_WITH_LICENSE_EXPRESSIONS = "77.0.3"  # setuptools 77.0.0 reads `license = "SPDX expression"`; 77.0.3 its fixes


def test_setuptools_reads_the_metadata_without_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metadata = apply_configuration(Distribution(), PYPROJECT).metadata
    assert [str(warning.message) for warning in caught] == []
    assert metadata.license_expression == "Apache-2.0"


def test_the_build_requires_a_setuptools_that_reads_license_expressions():
    requires = [Requirement(text) for text in load_file(PYPROJECT)["build-system"]["requires"]]
    (setuptools,) = [requirement for requirement in requires if requirement.name == "setuptools"]
    assert not setuptools.specifier.contains("76.1.0")
    assert setuptools.specifier.contains(FIRST_WITH_LICENSE_EXPRESSIONS)
