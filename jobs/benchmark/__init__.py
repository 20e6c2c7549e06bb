"""Benchmarks whose output is reported, not asserted: `python -m jobs.benchmark
model|pipeline|scale|cpu-stages|plan|heldout|prompts|select|export`, one module each (`python -m jobs.benchmark
WHAT --help` says what it measures), on a shared `harness`.

Each prints a short table and, as its last line, a JSON record (also written to `--json PATH`).
"""
