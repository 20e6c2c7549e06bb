"""The deployment files parse, run our CLI, and carry a job config that validates; a cluster would take them (KubeRay's
RayJob schema, what its controller refuses, no pod waiting on an object a user may not have); the example configs
load and reach their stores (a real S3 server on loopback)."""

from __future__ import annotations

import copy
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import jsonschema
import yaml

from pipeline.labelling import load_config
from pipeline.labelling.job import dry_run

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "jobs" / "deploy"
CONFIGS = REPO / "jobs" / "configs"
DEMO = REPO / "jobs" / "demo"
# KubeRay's RayJob v1 schema (its CRD at v1.7.0, trimmed: where it came from is in the file's "$comment")
RAYJOB_SCHEMA = Path(__file__).parent / "kuberay_rayjob_v1.schema.json"


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
    # the entry point runs on the head, in its Ray container (KubeRay's containers[0]): the config file is there
    head = ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    folder, _, name = path.rpartition("/")
    (mount,) = [mount for mount in head["containers"][0]["volumeMounts"] if mount["mountPath"] == folder]
    (volume,) = [volume for volume in head["volumes"] if volume["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    key = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])}.get(name, name)
    job = load_config(yaml.safe_load(config_map["data"][key]))
    assert job.compute.actors == (1, 4) and job.output.resume is True  # a daily run resumes the one output
    assert job.storage_options == {}  # credentials come from the environment or the instance role, never the file


def strict(schema: Any) -> Any:
    """`schema` as `kubectl create` applies it (strict field validation, kubectl's default): an object with listed
    properties refuses unknown fields instead of pruning them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def schema_errors(ray_job: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(strict(json.loads(RAYJOB_SCHEMA.read_text())))
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(ray_job)]


def test_kuberay_accepts_the_rayjob():
    ray_job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert schema_errors(ray_job) == []
    misspelt = copy.deepcopy(ray_job)  # the check itself: a field RayJob does not have, deep in a pod, is refused
    misspelt["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envfrom"] = []
    assert schema_errors(misspelt) == [
        "$.spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]: "
        "Additional properties are not allowed ('envfrom' was unexpected)"
    ]
    # what KubeRay's controller refuses (ray-operator/controllers/ray/utils/validation.go, ValidateRayClusterSpec)
    for group in ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def deploy_documents() -> list[dict]:
    return [document for path in sorted(DEPLOY.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text())]


def pod_specs() -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests start."""
    for document in deploy_documents():
        if document["kind"] == "RayJob":
            cluster = document["spec"]["rayClusterSpec"]
            yield "head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"worker group {group['groupName']}", group["template"]["spec"]
            if "submitterPodTemplate" in document["spec"]:
                yield "submitter", document["spec"]["submitterPodTemplate"]["spec"]
        elif document["kind"] == "CronJob":
            yield f"CronJob {document['metadata']['name']}", document["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def references(pod: dict) -> Iterator[tuple[str, str, bool]]:
    """(kind, name, optional) of each Secret and ConfigMap a pod's containers and volumes need."""
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        for source in container.get("envFrom", []):
            for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if field in source:
                    yield kind, source[field]["name"], source[field].get("optional", False)
        for variable in container.get("env", []):
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if field in variable.get("valueFrom", {}):
                    ref = variable["valueFrom"][field]
                    yield kind, ref["name"], ref.get("optional", False)
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], volume["secret"].get("optional", False)
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], volume["configMap"].get("optional", False)


def made_here() -> set[tuple[str, str]]:
    """(kind, name) of the objects these files create, or tell the user to create (`kubectl create configmap`)."""
    made = {(document["kind"], document["metadata"].get("name")) for document in deploy_documents()}
    told = {
        name
        for path in DEPLOY.glob("*.yaml")
        for name in re.findall(r"kubectl create configmap (\S+)", path.read_text())
    }
    return made | {("ConfigMap", name) for name in told}


def test_no_pod_waits_on_an_object_a_user_may_not_have():
    """A required Secret or ConfigMap that does not exist keeps a pod from starting (CreateContainerConfigError, or
    a volume that never mounts). The credentials Secret is one a user with an instance role or IRSA never makes."""
    made, required = made_here(), []
    for where, pod in pod_specs():
        required += [
            f"{where}: {kind} {name}"
            for kind, name, optional in references(pod)
            if not optional and (kind, name) not in made
        ]
        if "serviceAccountName" in pod:  # a pod naming a service account that does not exist is refused
            assert ("ServiceAccount", pod["serviceAccountName"]) in made, where
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for container in pod["containers"]:  # a mount of no volume is refused
            assert {mount["name"] for mount in container.get("volumeMounts", [])} <= volumes, where
    assert required == []


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
    assert (
        f"kubectl create configmap {configmap} --from-file=rayjob.yaml=jobs/deploy/rayjob.yaml"
        in (DEPLOY / "schedule.yaml").read_text()
    )
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
    assert report["inputs"]["images"] == len(list((DEMO / "images").iterdir())) and report["classes"] == [
        "bar",
        "triangle",
    ]


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
