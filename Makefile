# Two commands on a fresh machine: `make demo` (set up, then label the bundled sample) and `make test` (set up, then
# ruff and the test suite; what CI runs). Set-up: a virtual environment in .venv, the CPU torch wheel first, then the project.
VENV := .venv
PYTHON := $(VENV)/bin/python
# The venv's bin first on PATH: the tests run the console script, as a user of the venv would.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test

demo: $(VENV)/installed
	$(VENV)/bin/seggpt-autolabel demo

test: $(VENV)/installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTHON) -m pytest -q --durations=20

$(VENV)/installed: pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
	# the tests decode the label-studio export with the SDK's own brush decoder (numpy and Pillow only); its package
	# pins opencv-python-headless<4.13 and twenty more, which the project does not need: installed without them
	$(PYTHON) -m pip install --quiet --no-deps label-studio-sdk==2.1.2
	touch $@
