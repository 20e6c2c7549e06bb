"""The deployment files parse, run our CLI, and carry a job config that validates; the example configs load and
reach their stores (a real S3 server on loopback)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import fsspec
import yaml

from pipeline.config import load_config
from pipeline.job import dry_run

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "jobs" / "deploy"
CONFIGS = REPO / "jobs" / "configs"
DEMO = REPO / "jobs" / "demo"


def test_cluster_launcher_config():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("seggpt-autolabel" in command for command in cluster["setup_commands"])


def test_kuberay_job_runs_the_cli_on_its_config():
    config_map = yaml.safe_load((DEPLOY / "job-config.yaml").read_text())
    ray_job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert ray_job["kind"] == "RayJob"
    assert "name" not in ray_job["metadata"] and ray_job["metadata"]["generateName"]  # a new RayJob every run
    program, command, path = ray_job["spec"]["entrypoint"].split()
    assert (program, command) == ("seggpt-autolabel", "run")
    head = ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert path == f"{mount['mountPath']}/job.yaml"
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    job = load_config(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert job.compute.actors == (1, 4) and job.output.resume is True  # a daily run resumes the one output
    assert job.storage_options == {}  # credentials come from the environment or the instance role, never the file


def test_the_daily_schedule_creates_the_rayjob_from_its_configmap():
    documents = {document["kind"]: document for document in yaml.safe_load_all((DEPLOY / "schedule.yaml").read_text())}
    cron = documents["CronJob"]
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mount = container["volumeMounts"][0]
    assert container["command"] == ["kubectl", "create", "-f", f"{mount['mountPath']}/rayjob.yaml"]
    volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    configmap = volume["configMap"]["name"]
    # the ConfigMap is made from rayjob.yaml by the command written at the top of the file
    assert f"kubectl create configmap {configmap} --from-file=rayjob.yaml=jobs/deploy/rayjob.yaml" in (
        DEPLOY / "schedule.yaml").read_text()
    account = pod["serviceAccountName"]
    assert documents["ServiceAccount"]["metadata"]["name"] == account
    binding = documents["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    role = documents["Role"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]} in role["rules"]


# --- the example configs ------------------------------------------------------------------------------------------


def upload_demo(fs, images: str, prompts: str, checkpoint: str, *, shards: bool = False) -> None:
    """The demo's images (loose, or packed into two WebDataset shards), prompt set and checkpoint, at these places."""
    pictures = sorted((DEMO / "images").iterdir())
    if shards:
        for number in range(2):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for picture in pictures[number::2]:
                    tar.add(picture, arcname=picture.name)
            fs.pipe_file(f"{images}/shard{number}.tar", buffer.getvalue())
    else:
        for picture in pictures:
            fs.pipe_file(f"{images}/{picture.name}", picture.read_bytes())
    fs.put(str(DEMO / "prompts"), prompts, recursive=True)
    fs.put(str(DEMO / "checkpoint"), checkpoint, recursive=True)


def secret_keys(options: dict) -> list[str]:
    found = []
    for key, value in options.items():
        if any(marker in key.lower() for marker in ("key", "secret", "token", "password")):
            found.append(key)
        if isinstance(value, dict):
            found += secret_keys(value)
    return found


def test_local_example_runs_from_the_checkout(monkeypatch):
    monkeypatch.chdir(REPO)
    report = dry_run(str(CONFIGS / "local.yaml"))
    assert report["inputs"]["images"] == len(list((DEMO / "images").iterdir())) and report["classes"] == ["bar", "triangle"]


def test_aws_example_takes_credentials_and_endpoint_from_the_environment(s3_server, monkeypatch):
    fs = fsspec.filesystem("s3", **s3_server)
    fs.mkdir("my-bucket")
    upload_demo(fs, "my-bucket/images", "my-bucket/prompt-sets/vehicles", "my-bucket/models/seggpt-vit-large")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["client_kwargs"]["endpoint_url"])  # as an operator would
    config = load_config(CONFIGS / "aws-s3.yaml")
    assert secret_keys(config.storage_options) == []

    report = dry_run(config)  # the file as it is: credentials and endpoint from the environment
    assert report["inputs"]["images"] == 12 and report["classes"] == ["car", "truck", "bicycle"]


def test_s3_compatible_example_reaches_its_endpoint(s3_server):
    fs = fsspec.filesystem("s3", **s3_server)
    for bucket in ("datasets", "models", "labels"):
        fs.mkdir(bucket)
    upload_demo(fs, "datasets/street/shards", "datasets/prompt-sets/street", "models/seggpt-vit-large", shards=True)
    config = load_config(CONFIGS / "s3-compatible.yaml")
    assert config.storage_options["client_kwargs"]["endpoint_url"].startswith("https://")
    assert secret_keys(config.storage_options) == []

    endpoint = s3_server["client_kwargs"]["endpoint_url"]  # the store of this test instead of the example's
    report = dry_run(CONFIGS / "s3-compatible.yaml", (f"storage_options.client_kwargs.endpoint_url={endpoint}",))
    assert report["inputs"] == {"files": 2, "images": 12, "skipped": 0}
