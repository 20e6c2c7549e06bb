"""`jobs.benchmark.harness.ProcessPeaks`, which the pipeline and scale benchmarks report memory with: it finds the
processes under the driver and their peak resident memory, also of a process that has ended."""

from __future__ import annotations

import subprocess
import sys
import time

from jobs.benchmark.harness import ProcessPeaks, process_role

MIB = 1024  # KiB


def test_peaks_of_a_grandchild_that_ended():
    # a child that starts a grandchild holding 300 MiB for a second, then both end
    grandchild = "import time; block = bytearray(300 << 20); time.sleep(1.0)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    with ProcessPeaks(interval_s=0.1) as peaks:
        subprocess.run([sys.executable, "-c", child], check=True)
        time.sleep(0.2)
    others = {pid: peak for pid, peak in peaks.peaks.items() if "driver" not in peak["names"]}
    assert len(others) == 2
    assert max(peak["kib"] for peak in others.values()) >= 300 * MIB
    assert min(peak["kib"] for peak in others.values()) < 100 * MIB  # the child itself holds little
    driver = [peak for peak in peaks.peaks.values() if "driver" in peak["names"]]
    assert len(driver) == 1 and peaks.by_role()["driver"] == driver[0]["kib"]


def test_process_roles_from_titles():
    assert process_role("ray::MapWorker(MapBatches(SegGptPredictor)) ") == "ray::MapWorker(MapBatches(SegGptPredictor))"
    assert process_role("ray::IDLE") is None and process_role("/usr/bin/python3.11 -u worker.py") is None
    assert process_role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node=x") == "raylet"
