"""What the benchmarks share: their subcommand's `--json` and JSON record, a function run in a fresh process, the
memory of this process (/proc, `resource`) and of every process under it (`ProcessPeaks`), a local Ray, and
waiting for the GPU."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = str(Path(__file__).parents[1] / "demo" / "checkpoint")  # the demo's bundled model


def finish_parser(
    parser: argparse.ArgumentParser, benchmark: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    """The subcommand `parser` takes `--json PATH` (its last option) and runs `benchmark`."""
    parser.add_argument("--json", help="write the JSON record here too")
    parser.set_defaults(run=benchmark)
    return parser


def write_record(path: str | None, record: dict) -> None:
    """The benchmark's JSON record: to `path`, and as the last line printed."""
    text = json.dumps(record)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a fresh process (its threads and allocator settings stay there)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def run_child(function: Callable[..., None], *args: Any, env: dict[str, str] | None = None, name: str = "") -> dict:
    """`function(*args)` in a fresh interpreter started from the repository root (with `env`, as given before it
    starts), where `function` is a module-level function that prints a JSON record last; that record."""
    code = (
        f"import json, sys; from {function.__module__} import {function.__name__}; "
        f"{function.__name__}(*json.loads(sys.argv[1]))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], cwd=REPO, capture_output=True, text=True, env=env, check=False
    )
    if child.returncode:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"the measuring process{f' of {name}' if name else ''} failed (exit {child.returncode})")
    return json.loads(child.stdout.strip().splitlines()[-1])


def start_local_ray() -> None:
    """A local Ray on every CPU, quiet: no dashboard, no worker logs."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def _proc_number(path: str, field: str) -> int:
    """The number after `field:` in a /proc file of `key: value` lines (0 when absent)."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    """The process's resident set now (VmRSS, KiB)."""
    return _proc_number("/proc/self/status", "VmRSS")


def peak_kib() -> int:
    """The process's peak resident set over its life (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset the peak resident set (VmHWM) to the current one (Linux: clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def step_peak_kib(reset: bool) -> int:
    """The peak resident set since the last `reset_peak` (VmHWM), or over the process's life when it failed."""
    return _proc_number("/proc/self/status", "VmHWM") if reset else peak_kib()


def rchar() -> int:
    """Bytes this process has read through read-like system calls (/proc/self/io), listings excluded."""
    return _proc_number("/proc/self/io", "rchar")


class ProcessPeaks:
    """Peak resident memory (KiB) of this process and of every process under it (a local Ray's GCS, raylet and
    workers), sampled from /proc every `interval_s` while in the `with` block: a process that ends between two
    samples loses at most its last interval's growth.

    `peaks` maps each pid to its peak (VmHWM), its largest private resident memory sampled (RssAnon) and the Ray
    task or actor names it ran (from its process title).
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessPeaks:  # noqa: PYI034 (not subclassed)
        reset_peak()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self, measure: str = "kib") -> dict[str, int]:
        """The largest peak of each kind of process: the driver, Ray's own, and each worker by what it ran.

        `measure` "kib": the resident peak (VmHWM), which counts the pages of Ray's shared object store that a
        process has touched; "private_kib": the largest private resident memory sampled (RssAnon).
        """
        roles: dict[str, int] = {}
        for peak in self.peaks.values():
            role = _role_of(peak)
            roles[role] = max(roles.get(role, 0), peak[measure])
        return dict(sorted(roles.items(), key=lambda item: -item[1]))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) used by each kind of process, summed over its processes."""
        roles: dict[str, float] = {}
        for peak in self.peaks.values():
            role = _role_of(peak)
            roles[role] = roles.get(role, 0.0) + peak["cpu_s"]
        return dict(sorted(roles.items(), key=lambda item: -item[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        for pid in [me, *_descendants(me)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (OSError, ValueError):
                continue  # ended meanwhile
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            kib = {name: int(fields.get(name, "0 kB").split()[0]) for name in ("VmHWM", "RssAnon")}
            peak = self.peaks.setdefault(pid, {"kib": 0, "private_kib": 0, "cpu_s": 0.0, "names": set()})
            peak["kib"] = max(peak["kib"], kib["VmHWM"])
            peak["cpu_s"] = max(peak["cpu_s"], _cpu_seconds(pid))
            peak["private_kib"] = max(peak["private_kib"], kib["RssAnon"])
            name = "driver" if pid == me else process_role(title)
            if name:
                peak["names"].add(name)


def process_role(title: str) -> str | None:
    """`ray::MapWorker(MapBatches(SegGptPredictor))` -> the same; `.../raylet ...` -> `raylet`; None when idle or
    not yet named."""
    if title.startswith("ray::"):
        name = title.split()[0]
        return None if name == "ray::IDLE" else name
    name = Path(title.split()[0]).name if title.strip() else ""
    return None if not name or name.startswith("python") else name  # a worker before it names itself


def _role_of(peak: dict) -> str:
    """The kind of a sampled process: the Ray tasks and actors it ran, or an idle worker."""
    return " + ".join(sorted(peak["names"])) or "ray worker (idle)"


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/`pid`/stat after the process name (state first), or None when it ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (0 when it ended)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
