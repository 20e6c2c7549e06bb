"""`python -m jobs.train CONFIG.yaml [--set section.key=value ...]`: the same as `seggpt-autolabel train`."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
