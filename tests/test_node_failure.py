"""The failure model of ARCHITECTURE.md, for real: a worker node dies mid-run → Ray retries; in the output no key is
missing and none is twice.

A process can hold only one Ray (and the test session may already run its own), so the cluster lives in a
subprocess: a head node with no CPUs (as on a real cluster, so every task and actor, the model's included, runs on
a worker) and one worker node. Once the first labels file is written, the worker node is killed (no graceful
shutdown), a fresh one joins, and the job has to finish on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from test_job import long_job, read_labels

REPO = Path(__file__).resolve().parents[1]

CLUSTER_SCRIPT = r"""
import json, sys, threading, time, traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.labelling.job import autolabel

config = json.loads(Path(sys.argv[1]).read_text())
result_path = Path(sys.argv[2])
labels = Path(config["output"]["uri"]) / "labels"
result = {}

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
worker = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)

def run():
    try:
        result["summary"] = vars(autolabel(config, log=lambda line: None))
    except BaseException:
        result["error"] = traceback.format_exc()

job = threading.Thread(target=run, daemon=True)
start = time.monotonic()
job.start()
deadline = start + 60
while not list(labels.glob("*.parquet")) and job.is_alive() and time.monotonic() < deadline:
    time.sleep(0.02)
result["files_at_kill"] = len(list(labels.glob("*.parquet")))
result["job_done_at_kill"] = not job.is_alive()
result["kill_at_s"] = round(time.monotonic() - start, 2)
cluster.remove_node(worker, allow_graceful=False)  # the node dies: its raylet, workers and object store
cluster.add_node(num_cpus=2)
job.join(timeout=max(1.0, start + 150 - time.monotonic()))  # generous: a hang, not a slow machine
result["job_alive"] = job.is_alive()
result["seconds"] = round(time.monotonic() - start, 2)
result_path.write_text(json.dumps(result))
sys.stdout.flush()
if job.is_alive():
    import os
    os._exit(3)  # the job hangs: leave its thread and let the test kill the process group
ray.shutdown()
cluster.shutdown()
"""


def run_cluster_script(tmp_path: Path, script_text: str, config: dict) -> tuple[dict, str, int]:
    """Run `script_text` (a Cluster of its own) in a fresh process on the job `config`, killed after 240 s: the
    result it wrote, its output and its exit status."""
    config_path, script, result_path = tmp_path / "job.json", tmp_path / "cluster.py", tmp_path / "result.json"
    config_path.write_text(json.dumps(config))
    script.write_text(script_text)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, str(script), str(config_path), str(result_path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert result_path.exists(), f"cluster script exited {process.returncode} without a result:\n{log[-4000:]}"
    result = json.loads(result_path.read_text())
    print(result)
    return result, log, process.returncode


def test_worker_node_dies_mid_run(tmp_path):
    count = 100  # two blocks of loose files (64 each): the node goes while the model works through the first
    config = long_job(tmp_path, count)
    output = tmp_path / "out"
    result, log, returncode = run_cluster_script(tmp_path, CLUSTER_SCRIPT, config)

    # The worker died part-way: after the first labels file, before the job ended.
    assert result["files_at_kill"] > 0 and not result["job_done_at_kill"], result
    assert not result["job_alive"], f"the job did not finish within its deadline: {result}\n{log[-4000:]}"
    assert "error" not in result, result["error"]
    assert returncode == 0, log[-4000:]
    summary = result["summary"]
    assert (summary["ok"], summary["error"], summary["skipped"]) == (count, 0, 0), summary

    table = read_labels(str(output), {})
    keys = table["key"].to_pylist()
    assert sorted(keys) == [f"{i:03d}.jpg" for i in range(count)]  # every key, each exactly once
    assert set(table["status"].to_pylist()) == {"ok"}
    assert (output / "_SUCCESS").exists()
    assert json.loads((output / "_job.json").read_text())["counts"] == {
        "ok": count,
        "error": 0,
        "skipped": 0,
        "added": count,
    }
    assert len(list((output / "masks").glob("*.png"))) == count
