"""`auto` on a cluster whose GPU node joins after the job starts (a KubeRay or `ray up` cluster still coming up).

A process can hold only one Ray (and the test session may already run its own), so the cluster lives in a
subprocess (`ray.cluster_utils.Cluster`). Its head has CPUs only. The job starts with `compute.gpu_wait_s`, and once
it says it is waiting, a node that declares one GPU joins (it has no CUDA: the test checks the decision and what the
model actor asked Ray for, not CUDA). Then, with the GPU node gone again, the cluster's autoscaling config (what an
autoscaler reports to Ray's GCS) lists a GPU node type, and `auto` settles on a GPU without waiting.
"""

from __future__ import annotations

import json

import pytest
from test_job import TINY, encoded, job_config, make_assets, picture
from test_node_failure import run_cluster_script

from pipeline.config import ConfigError
from pipeline.labelling import load_config

CLUSTER_SCRIPT = r"""
import json, sys, threading, time, traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.core.generated import autoscaler_pb2, gcs_pb2

from pipeline.labelling import autolabel, load_config, resolve_compute

config = json.loads(Path(sys.argv[1]).read_text())
result_path = Path(sys.argv[2])
result = {"lines": []}

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
ray.init(address=cluster.address, log_to_driver=False)

def settle(**compute):
    start = time.monotonic()
    settled = resolve_compute(load_config({**config, "compute": {**config["compute"], **compute}}), log=print)
    return {**vars(settled), "seconds": round(time.monotonic() - start, 2)}

try:
    result["no_gpu_within_1_s"] = settle(gpu_wait_s=1)
except BaseException:
    result["no_gpu_within_1_s"] = traceback.format_exc()
bfloat16 = {**config["model"], "dtype": "bfloat16", "attention": "auto"}
no_wait = {**config["compute"], "gpu_wait_s": 0}
cpu_bfloat16 = load_config({**config, "model": bfloat16, "compute": no_wait})
result["cpu_bfloat16_attention"] = resolve_compute(cpu_bfloat16).attention

def run():
    try:
        result["summary"] = vars(autolabel(config, log=result["lines"].append))
    except BaseException:
        result["error"] = traceback.format_exc()

job = threading.Thread(target=run, daemon=True)
start = time.monotonic()
job.start()
while not any("waiting" in line for line in result["lines"]) and job.is_alive() and time.monotonic() < start + 30:
    time.sleep(0.05)
result["waited_for_line_s"] = round(time.monotonic() - start, 2)
gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)  # declares a GPU it does not have
result["gpu_node"] = gpu_node.node_id
job.join(timeout=150)
result["job_alive"] = job.is_alive()
actors = [gcs_pb2.ActorTableData.FromString(data)
          for data in ray._private.state.state._connect_and_get_accessor().get_actor_table(None, None)]
result["model_actors"] = [{"resources": dict(actor.required_resources), "node": actor.address.node_id.hex()}
                          for actor in actors if "SegGptPredictor" in actor.class_name]

cluster.remove_node(gpu_node)
deadline = time.monotonic() + 30
while ray.cluster_resources().get("GPU", 0) and time.monotonic() < deadline:
    time.sleep(0.1)
group = autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4)
ray._private.worker.global_worker.gcs_client.report_cluster_config(
    autoscaler_pb2.ClusterConfig(node_group_configs=[group]).SerializeToString())
try:
    result["autoscaler_gpus"] = settle(gpu_wait_s=0, gpus_per_actor="auto")
    result["autoscaler_attention"] = resolve_compute(load_config({**config, "model": {**config["model"],
                                                               "attention": "auto"}}), log=print).attention
except BaseException:
    result["autoscaler_gpus"] = traceback.format_exc()
result_path.write_text(json.dumps(result))
sys.stdout.flush()
if job.is_alive():
    import os
    os._exit(3)
ray.shutdown()
cluster.shutdown()
"""


def test_a_gpu_node_that_joins_after_the_start_gets_the_model(tmp_path):
    assets = make_assets(tmp_path, TINY)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.jpg").write_bytes(encoded(picture(i, (30, 20))))
    output = tmp_path / "out"
    config = job_config(assets, str(data), str(output), {})
    config["compute"].update(gpu_wait_s=60)
    config["model"]["attention"] = "sdpa"  # flex would compile for half a minute on this CPU
    result, log, returncode = run_cluster_script(tmp_path, CLUSTER_SCRIPT, config)
    assert "error" not in result, result["error"]
    assert not result["job_alive"] and returncode == 0, log[-4000:]

    # No GPU and none joining: after waiting its bound, `auto` settles on the CPU and says why.
    alone = result["no_gpu_within_1_s"]
    assert isinstance(alone, dict), alone
    assert (alone["gpus_per_actor"], alone["dtype"], alone["attention"]) == (0.0, "float32", "sdpa")
    assert 1 <= alone["seconds"] < 5 and "within compute.gpu_wait_s (1 s)" in alone["reason"]
    assert result["cpu_bfloat16_attention"] == "chunked"  # bfloat16 asked for on CPU model actors

    # The job said it was waiting, before the GPU node existed, and then settled on the node that joined ...
    lines = result["lines"]
    assert result["waited_for_line_s"] < 30 and lines[0].startswith("compute: waiting up to 60 s for a GPU node")
    decision = next(line for line in lines if line.startswith("compute: 1 GPU"))
    assert "bfloat16" in decision and "a GPU node joined after" in decision, lines
    assert result["summary"]["ok"] == 4
    run = json.loads((output / "_job.json").read_text())
    assert run["compute"]["gpus_per_actor"] == 1.0 and run["compute"]["dtype"] == "bfloat16"
    assert run["compute"]["reason"].startswith("a GPU node joined after")
    # ... the model actor asked Ray for the GPU and ran there ...
    assert result["model_actors"] and all(
        actor == {"resources": {"CPU": 0.5, "GPU": 1.0}, "node": result["gpu_node"]} for actor in result["model_actors"]
    ), result["model_actors"]
    # ... and `_job.json` says what the actor actually ran: bfloat16 on the CPU, since the node has no CUDA.
    assert run["ran"] == [{"device": "cpu", "dtype": "bfloat16", "attention": "sdpa", "images": 4}]

    # GPU node types in the cluster's autoscaling config: a GPU at once (the actors' demand scales the group up).
    scaled = result["autoscaler_gpus"]
    assert isinstance(scaled, dict), scaled
    assert (scaled["gpus_per_actor"], scaled["dtype"]) == (1.0, "bfloat16") and scaled["seconds"] < 1
    assert "autoscaler" in scaled["reason"] and result["autoscaler_attention"] == "flex"


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "compute.gpu_wait_s: expected a number >= 0"),
        ("long", "compute.gpu_wait_s: expected a number, got 'long'"),
    ],
)
def test_gpu_wait_s_is_checked(tmp_path, value, message):
    config = job_config(tmp_path, str(tmp_path), str(tmp_path / "out"), {})
    config["compute"]["gpu_wait_s"] = value
    with pytest.raises(ConfigError, match=message):
        load_config(config)
    assert load_config(job_config(tmp_path, str(tmp_path), str(tmp_path / "out"), {})).compute.gpu_wait_s == 0
