"""Job config: defaults, errors that name their key, --set overrides, redaction."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError
from pipeline.labelling import JobConfig, load_config
from pipeline.prompts import TuneConfig, load_tune_config
from pipeline.prompts.tune import tune

MINIMAL = {
    "input": {"uri": "s3://data/images/"},
    "prompts": {"uri": "s3://data/prompts/", "classes": ["road", "car"]},
    "model": {"checkpoint": "s3://models/seggpt"},
    "output": {"uri": "s3://data/labels-out"},
}


def sections(config: type[Config]) -> dict[str, type]:
    """The section models of a whole config, by name (every field but `storage_options`)."""
    return {name: field.annotation for name, field in config.model_fields.items() if name != "storage_options"}


def with_change(dotted: str, value: object) -> dict:
    """MINIMAL with one key set (or removed, for value `...`)."""
    config = copy.deepcopy(MINIMAL)
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return config


def test_defaults_from_a_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    config = load_config(path)
    assert isinstance(config, JobConfig)
    assert config.input.uri == "s3://data/images/" and config.input.uris == ("s3://data/images/",)
    assert (config.input.format, config.input.image_column) == ("auto", "image")
    assert config.input.exif_transpose is True
    assert config.prompts.classes == ("road", "car")
    assert (config.prompts.mask_format, config.prompts.embedding) == ("labels", "semantic")
    assert config.model.dtype == "auto"
    assert (config.output.png, config.output.resume, config.output.rows_per_file) == (True, True, 256)
    assert config.compute.batch_size == 8
    assert config.compute.actors == (1, 1)
    assert config.compute.gpus_per_actor == "auto"
    assert config.compute.cpus_per_actor == 1.0
    assert config.storage_options == {} and config.storage.retry_s == 300.0


def test_full_config_keeps_every_value():
    config = load_config(
        {
            **MINIMAL,
            "input": {
                "uri": ["a/", "b/*.jpg"],
                "format": "parquet",
                "image_column": "img",
                "exif_transpose": False,
                "jpeg_draft": True,
                "max_pixels": 1000,
            },
            "model": {"checkpoint": "ckpt", "dtype": "bfloat16", "attention": "flex"},
            "output": {"uri": "out", "png": False, "resume": False},
            "compute": {
                "batch_size": 4,
                "actors": [1, 3],
                "gpus_per_actor": 0.5,
                "cpus_per_actor": 2,
                "cpus_per_task": 0.5,
            },
            "storage": {"retry_s": 30},
            "storage_options": {"anon": True},
        }
    )
    cwd = os.getcwd()  # local paths are made absolute on the driver: Ray's workers run in other folders
    assert config.input.uris == (f"{cwd}/a", f"{cwd}/b/*.jpg") and config.input.exif_transpose is False
    assert (config.model.checkpoint, config.output.uri) == (f"{cwd}/ckpt", f"{cwd}/out")
    assert config.compute.actors == (1, 3) and config.compute.gpus_per_actor == 0.5
    assert config.input.jpeg_draft is True and config.model.attention == "flex" and config.compute.cpus_per_task == 0.5
    assert config.output.png is False and config.storage_options == {"anon": True}
    assert config.storage.retry_s == 30.0 and config.input.max_pixels == 1000


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("compute.batch_size", "x", "compute.batch_size: expected int, got 'x'"),
        ("compute.batch_size", 0, "compute.batch_size: expected an int > 0"),
        ("compute.batch_size", True, "compute.batch_size: expected int, got True"),
        ("compute.actors", [2, 1], "compute.actors: min 2 is greater than max 1"),
        ("compute.actors", [0, 1], "compute.actors[0]: expected an int > 0"),
        ("compute.actors", 2, "compute.actors: expected [min, max], got 2"),
        ("compute.gpus_per_actor", -1, "compute.gpus_per_actor: expected a number >= 0"),
        ("compute.gpus_per_actor", "all", "compute.gpus_per_actor: expected a number, got 'all'"),
        ("compute.cpus_per_actor", "1", "compute.cpus_per_actor: expected a number, got '1'"),
        ("input.fromat", "images", "input.fromat: unknown key"),
        ("input.format", "tar", "input.format: expected one of auto | images | webdataset | parquet, got"),
        ("input.uri", ["a", 3], "input.uri[1]: expected a non-empty string, got 3"),
        ("input.uri", ..., "input.uri: missing required key"),
        ("prompts.classes", [], "prompts.classes: expected a non-empty list of class names"),
        ("prompts.classes", ["a", "a"], "prompts.classes: duplicate class names ['a']"),
        ("prompts.mask_format", "png", "prompts.mask_format: expected one of labels | rgb"),
        ("model.dtype", "fp8", "model.dtype: expected one of auto | float32 | bfloat16 | float16"),
        ("model.checkpoint", ..., "model.checkpoint: missing required key"),
        ("output.png", "yes", "output.png: expected true or false, got 'yes'"),
        ("output", ..., "output: missing required section"),
        ("output", ["x"], "output: expected a mapping, got list"),
        ("storage_options", "anon", "storage_options: expected a mapping, got 'anon'"),
        ("storage.retry_s", -1, "storage.retry_s: expected a number >= 0"),
        ("input.max_pixels", 0, "input.max_pixels: expected an int > 0"),
        ("storage.retries", 3, "storage.retries: unknown key"),
        ("extra", {}, "extra: unknown section"),
    ],
)
def test_errors_name_their_key(dotted, value, message):
    with pytest.raises(ConfigError) as caught:
        load_config(with_change(dotted, value))
    assert str(caught.value).startswith(message)


def test_unreadable_or_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_overrides_parse_yaml_values():
    config = load_config(
        MINIMAL,
        [
            "compute.actors=[1,2]",
            "compute.batch_size=16",
            "output.png=false",
            "input.uri=s3://other/*.png",
            "storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert config.compute.actors == (1, 2) and config.compute.batch_size == 16
    assert config.output.png is False and config.input.uri == "s3://other/*.png"
    assert config.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert MINIMAL["input"]["uri"] == "s3://data/images/"  # the source dict is not modified


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compute.actorz=[1,2]", "compute.actorz: unknown key"),
        ("computer.actors=[1,2]", "computer: unknown section"),
        ("compute.actors.min=1", "compute.actors.min: unknown key"),
        ("compute.batch_size", "--set compute.batch_size: expected section.key=value"),
        ("batch_size=3", "--set batch_size=3: expected section.key=value"),
        ("compute.batch_size=x", "compute.batch_size: expected int, got 'x'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(MINIMAL, [override])
    assert str(caught.value).startswith(message)


def test_to_dict_redacts_secrets_recursively():
    options = {
        "key": "AKIA",
        "secret": "s3cr3t",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000", "aws_session_token": "tok"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "credentials": {"user": "x"},
        "Password": "pw",
    }
    config = load_config({**MINIMAL, "storage_options": options})
    data = config.to_dict()
    assert data["storage_options"] == {
        "key": "***",
        "secret": "***",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000", "aws_session_token": "***"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "credentials": "***",
        "Password": "***",
    }
    assert data["compute"]["actors"] == [1, 1] and data["prompts"]["classes"] == ["road", "car"]
    assert config.storage_options["secret"] == "s3cr3t"
    assert config.to_dict(redact=False)["storage_options"]["client_kwargs"]["aws_session_token"] == "tok"
    assert load_config(config.to_dict(redact=False)) == config  # round trip


def test_example_config_of_the_docs_is_valid():
    example = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "example.yaml"
    config = load_config(example)
    assert config.compute.actors == (1, 4) and config.prompts.classes == ("car", "truck", "bicycle")
    raw = yaml.safe_load(example.read_text())
    for name, section in sections(JobConfig).items():  # it shows every key there is
        assert sorted(raw[name]) == sorted(section.model_fields), name
    assert (config.input.max_pixels, config.storage.retry_s) == (100_000_000, 300.0)


def test_remote_uris_are_kept_and_local_ones_made_absolute():
    config = load_config(
        {**MINIMAL, "input": {"uri": ["s3://bucket/a/", "file:///data/b", "~/c"]}, "output": {"uri": "gs://bucket/out"}}
    )
    assert config.input.uris == ("s3://bucket/a/", "/data/b", os.path.expanduser("~/c"))
    assert config.output.uri == "gs://bucket/out"


def test_tune_config_of_the_docs_shows_every_key_and_bad_ones_are_refused():
    example = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tune.yaml"
    config = load_tune_config(example)
    assert config.prompt.classes == ("road", "car", "person") and config.data.val_fraction == 0.25
    raw = yaml.safe_load(example.read_text())
    for name, section in sections(TuneConfig).items():
        assert sorted(raw[name]) == sorted(section.model_fields), name
    with pytest.raises(ConfigError, match=r"^prompt.classes: missing required key"):
        load_tune_config({**raw, "prompt": {"uri": "s3://b/p"}})
    with pytest.raises(ConfigError, match=r"^train.lr: expected a number, got 'fast'"):
        load_tune_config(example, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"^data.val_fraction: expected a number between 0 and 1, got 1.5"):
        tune(example, ("data.val_fraction=1.5",))  # refused before anything is read
