"""The deployment files parse, run our CLI, and carry a job config that validates."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_launcher_config():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("seggpt-autolabel" in command for command in cluster["setup_commands"])


def test_kuberay_job_runs_the_cli_on_its_config():
    config_map, ray_job = yaml.safe_load_all((REPO / "jobs" / "deploy" / "rayjob.yaml").read_text())
    assert ray_job["kind"] == "RayJob"
    program, command, path = ray_job["spec"]["entrypoint"].split()
    assert (program, command) == ("seggpt-autolabel", "run")
    head = ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert path == f"{mount['mountPath']}/job.yaml"
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    job = load_config(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert job.compute.actors == (1, 4)
