"""`input.manifest`: the inputs a run takes from a manifest (a Parquet/CSV table of keys, or an S3 Inventory), with
nothing listed. At the size where a resume matters: 200,000 keys, all but a few labelled already, and only the new
images present, so that a run that read (or listed) anything it does not label would show it."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from urllib.parse import quote_plus

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest
import ray

import pipeline.labelling.work
import pipeline.storage.manifest
from model.processing import decode_png
from pipeline.config import ConfigError
from pipeline.labelling import load_config
from pipeline.labelling.job import autolabel, dry_run, plan
from pipeline.labelling.work import RunKeys, plan_work
from pipeline.storage.listing import InputError
from pipeline.storage.output import LABELS_SCHEMA
from pipeline.storage.retry import Retry
from tests.test_job import TINY, encoded, expected_map, job_config, make_assets, picture, read_labels

KEYS = 200_000


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("assets"), TINY)


def planned_inputs(config: dict, storage_options: dict) -> pa.Table:
    """The work items of a fresh run over `config`'s inputs, as the job plans them on Ray."""
    inputs = plan(config).inputs
    work = plan_work(inputs, None, {}, RunKeys("model", "prompts", inputs.config_key), storage_options, Retry(5))
    return pa.concat_tables(ray.get(work.shards + work.loose)).sort_by("key")


def seed_row(assets: Path, tmp_path: Path, name: str, data: bytes, **input_options) -> dict:
    """One real labels row of this model and prompt set: `name` (an image, or a tar shard) labelled by a run."""
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / name).write_bytes(data)
    summary = autolabel(job_config(assets, str(folder), str(tmp_path / "seed-out"), {}, **input_options), log=print)
    assert summary.ok == 1
    (row,) = read_labels(str(tmp_path / "seed-out"), {}).to_pylist()
    return row


def labelled_before(output: Path, row: dict, keys: list[str], **columns) -> None:
    """`labels/` holding `row` once per key (as 4 files), as if earlier runs had labelled them."""
    labels = output / "labels"
    labels.mkdir(parents=True)
    table = pa.Table.from_pylist([row], schema=LABELS_SCHEMA).take(np.zeros(len(keys), np.int64))
    for name, values in {"key": keys, **columns}.items():
        field = LABELS_SCHEMA.field(name)
        table = table.set_column(LABELS_SCHEMA.get_field_index(name), field, pa.array(values, field.type))
    for part, first in enumerate(range(0, len(keys), len(keys) // 4 + 1)):
        pq.write_table(table.slice(first, len(keys) // 4 + 1), labels / f"earlier-{part}.parquet")


def labelled_here(output: Path) -> dict[str, dict]:
    """The rows of `labels/` that the run wrote (those of `labelled_before` have no source), by key; and every key
    of `labels/` is there once."""
    table = read_labels(str(output), {})
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key is in labels/ more than once"
    new = table.filter(pc.invert(pc.is_in(table["source"], value_set=pa.array([None], pa.string()))))
    return {row["key"]: row for row in new.to_pylist()}


def smaller_pieces(monkeypatch) -> None:
    """Plan in pieces of 100,000 keys (read by 2 tasks or more), partitions of 100,000, index tasks of 2 files."""
    monkeypatch.setattr(pipeline.storage.manifest, "PIECE_ROWS", 100_000)
    monkeypatch.setattr(pipeline.labelling.work, "PARTITION_ROWS", 100_000)
    monkeypatch.setattr(pipeline.labelling.work, "_INDEX_FILES_PER_TASK", 2)


def test_a_manifest_of_200000_keys_labels_exactly_the_new_images(assets, tmp_path, ray_session, monkeypatch):
    smaller_pieces(monkeypatch)
    row = seed_row(assets, tmp_path, "seed.jpg", encoded(picture(0, (20, 16))))
    keys = [f"day{i // 20_000:02d}/{i:06d}.jpg" for i in range(KEYS)]
    data = tmp_path / "data"
    new = {keys[i]: encoded(picture(i, (24, 18))) for i in range(0, KEYS, KEYS // 8)}  # 8 new, spread over the keys
    for key, payload in new.items():
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        (data / key).write_bytes(payload)
    (data / "stray.jpg").write_bytes(encoded(picture(1, (24, 18))))  # in the folder, not in the manifest
    done = [key for key in keys if key not in new]
    output = tmp_path / "out"
    labelled_before(output, {**row, "source": None}, done)
    pq.write_table(
        pa.table({"key": keys, "size": np.arange(KEYS)}), tmp_path / "manifest.parquet", row_group_size=25_000
    )

    config = job_config(assets, str(data), str(output), {}, manifest=str(tmp_path / "manifest.parquet"))
    lines: list[str] = []
    summary = autolabel(config, log=lines.append)

    assert lines[0] == f"planned: {KEYS} input files, {KEYS - 8} images done before, 8 files or shards to read"
    assert summary.partitions == 2
    assert (summary.ok, summary.error, summary.skipped, summary.added) == (8, 0, KEYS - 8, 8)  # nothing else read
    rows = labelled_here(output)
    assert sorted(rows) == sorted(new)  # the new images, and only they, labelled by this run
    for key, payload in new.items():
        assert rows[key]["status"] == "ok"
        assert np.array_equal(decode_png(rows[key]["mask"]), expected_map(assets, payload))
    assert read_labels(str(output), {}).num_rows == KEYS  # every key once


def shard(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_a_manifest_of_200000_webdataset_shards_labels_exactly_the_new_members(
    assets, tmp_path, ray_session, monkeypatch
):
    """Done shards cost one labels row each (their `shard_images` says they are whole); a shard half done has its
    other half labelled; new shards are labelled whole. The rows of a shard's members meet its shard in one of
    the partitions."""
    smaller_pieces(monkeypatch)
    shard(tmp_path / "seed.tar", {"000.jpg": encoded(picture(0, (20, 16)))})
    row = seed_row(assets, tmp_path, "seed.tar", (tmp_path / "seed.tar").read_bytes(), format="webdataset")
    assert row["shard_images"] == 1
    shards = [f"part{i // 50_000}/{i:06d}.tar" for i in range(KEYS)]
    data = tmp_path / "data"
    members = {
        name: {f"{m}.jpg": encoded(picture(i * 10 + m, (24, 18))) for m in range(2)}
        for i, name in ((3, shards[3]), (70_000, shards[70_000]), (KEYS - 1, shards[-1]))
    }
    for name, content in members.items():
        shard(data / name, content)
    half = shards[3]  # labelled before: its member 0 only
    whole = [name for name in shards if name not in members]
    done = [f"{name}/000.jpg" for name in whole] + [f"{half}/0.jpg"]
    output = tmp_path / "out"
    labelled_before(output, {**row, "source": None}, done, shard_images=[1] * len(whole) + [2])
    with open(tmp_path / "manifest.csv", "w") as file:  # CSV this time
        file.write("size,key\n" + "".join(f"{i},{name}\n" for i, name in enumerate(shards)))

    config = job_config(
        assets, str(data), str(output), {}, manifest=str(tmp_path / "manifest.csv"), format="webdataset"
    )
    lines: list[str] = []
    summary = autolabel(config, log=lines.append)

    assert lines[0] == f"planned: {KEYS} input files, {len(done)} images done before, 3 files or shards to read"
    assert summary.partitions == -(-(tmp_path / "manifest.csv").stat().st_size // 16 // 100_000)  # keys guessed by size
    assert (summary.ok, summary.error) == (5, 0)
    rows = labelled_here(output)
    expected = {f"{name}/{member}": payload for name, content in members.items() for member, payload in content.items()}
    del expected[f"{half}/0.jpg"]
    assert sorted(rows) == sorted(expected)
    for key, payload in expected.items():
        assert np.array_equal(decode_png(rows[key]["mask"]), expected_map(assets, payload))
    assert read_labels(str(output), {}).num_rows == len(done) + 5


INVENTORY_KEYS = ["imgs/a.jpg", "imgs/with space.jpg", "imgs/plus+sign.jpg", "imgs/deep/b.jpg", "other/c.jpg"]


def inventory_files(file_format: str, keys: list[str]) -> list[tuple[str, bytes]]:
    """S3 Inventory data files of `keys` in bucket "data", as S3 writes them: two files, gzipped CSV with no
    header and URL-encoded keys, or Parquet / ORC with lower-case column names."""
    halves = [keys[:2], keys[2:]]
    if file_format == "CSV":
        texts = ["".join(f'"data","{quote_plus(key)}","123"\n' for key in half) for half in halves]
        return [(f"{i}.csv.gz", gzip.compress(text.encode())) for i, text in enumerate(texts)]
    files = []
    for i, half in enumerate(halves):
        table = pa.table({"bucket": ["data"] * len(half), "key": half, "size": [123] * len(half)})
        buffer = io.BytesIO()
        (pq.write_table if file_format == "Parquet" else orc.write_table)(table, buffer)
        files.append((f"{i}.{file_format.lower()}", buffer.getvalue()))
    return files


def s3_inventory(fs, file_format: str) -> tuple[str, str, dict[str, bytes]]:
    """Bucket `data-<format>` holding `INVENTORY_KEYS` and a stray image, and its inventory in bucket
    `inventory-<format>`: (data bucket, manifest URI, the images by key)."""
    suffix = file_format.lower()
    data, inventory = f"data-{suffix}", f"inventory-{suffix}"
    fs.mkdir(data)
    fs.mkdir(inventory)
    images = {key: encoded(picture(i, (24, 18))) for i, key in enumerate(INVENTORY_KEYS)}
    for key, payload in {**images, "imgs/stray.jpg": images["imgs/a.jpg"]}.items():
        fs.pipe_file(f"{data}/{key}", payload)
    files = []
    for name, payload in inventory_files(file_format, INVENTORY_KEYS):
        fs.pipe_file(f"{inventory}/{data}/daily/data/{name}", payload)
        files.append({"key": f"{data}/daily/data/{name}", "size": len(payload), "MD5checksum": "x"})
    manifest = {
        "sourceBucket": data,
        "destinationBucket": f"arn:aws:s3:::{inventory}",
        "version": "2016-11-30",
        "fileFormat": file_format,
        "fileSchema": "Bucket, Key, Size",
        "files": files,
    }
    manifest_uri = f"s3://{inventory}/{data}/daily/2026-12-07T01-00Z/manifest.json"
    fs.pipe_file(manifest_uri, json.dumps(manifest).encode())
    return data, manifest_uri, images


UNDER_PREFIX = sorted(key.removeprefix("imgs/") for key in INVENTORY_KEYS if key.startswith("imgs/"))


def test_an_s3_inventory_is_a_manifest(assets, s3_server, ray_session):
    """The inventory (gzipped CSV) of bucket "data" lives in bucket "inventory"; the run takes the keys under
    input.uri's prefix, decoded, and labels no object that the inventory does not list."""
    data, manifest_uri, images = s3_inventory(fsspec.filesystem("s3", **s3_server), "CSV")
    config = job_config(assets, f"s3://{data}/imgs", f"s3://{data}/out", s3_server, manifest=manifest_uri)
    summary = autolabel(config, log=lambda line: None)

    assert (summary.ok, summary.error) == (len(UNDER_PREFIX), 0)
    table = read_labels(f"s3://{data}/out", s3_server)
    assert sorted(table["key"].to_pylist()) == UNDER_PREFIX
    for row in table.to_pylist():
        assert row["source"] == f"s3://{data}/imgs/{row['key']}"
        assert np.array_equal(decode_png(row["mask"]), expected_map(assets, images[f"imgs/{row['key']}"]))


@pytest.mark.parametrize("file_format", ["Parquet", "ORC"])
def test_parquet_and_orc_inventories_list_the_same_inputs(file_format, assets, s3_server, ray_session):
    data, manifest_uri, _ = s3_inventory(fsspec.filesystem("s3", **s3_server), file_format)
    config = job_config(assets, f"s3://{data}/imgs", f"s3://{data}/out", s3_server, manifest=manifest_uri)
    listing = planned_inputs(config, s3_server)
    assert listing["key"].to_pylist() == UNDER_PREFIX
    assert listing["source"].to_pylist() == [f"s3://{data}/imgs/{key}" for key in UNDER_PREFIX]


def test_a_folder_of_csv_and_parquet_manifests(assets, tmp_path, ray_session):
    """A folder's manifest files together, gzipped CSV too; keys of other kinds skipped, as a listing skips them."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    pq.write_table(pa.table({"key": ["a.jpg", "sub/b.png"]}), manifests / "0.parquet")
    (manifests / "1.csv.gz").write_bytes(gzip.compress(b"key,other\nc.jpeg,1\nnotes.txt,2\n.hidden.jpg,3\n"))
    (manifests / "README").write_text("not a manifest")
    config = job_config(assets, str(tmp_path / "data"), str(tmp_path / "out"), {}, manifest=str(manifests))

    listing = planned_inputs(config, {})

    assert listing["key"].to_pylist() == ["a.jpg", "c.jpeg", "sub/b.png"]
    assert listing["source"].to_pylist() == [
        f"file://{tmp_path}/data/{key}" for key in ["a.jpg", "c.jpeg", "sub/b.png"]
    ]
    assert set(listing["kind"].to_pylist()) == {"images"}


@pytest.mark.parametrize(
    "files, input_options, message",
    [
        ({"m.parquet": pa.table({"name": ["a.jpg"]})}, {}, r"input.manifest: .*m.parquet has no column 'key'"),
        ({"m.csv": "name\na.jpg\n"}, {}, r"input.manifest: .*m.csv has no column 'key'"),
        ({"m.csv": "key\na.jpg\nb.jpg\na.jpg\n"}, {}, r"input.manifest: 1 duplicate key\(s\), e.g. 'a.jpg'"),
        ({"m.csv": "key\nnotes.txt\n"}, {}, r"input.manifest: no image, .tar or .parquet keys in"),
        ({"m.csv": "key\na.jpg\n"}, {"format": "webdataset"}, r"input.manifest: no webdataset keys in"),
        ({"m.parquet": pa.table({"key": ["a.jpg", None]})}, {}, r"input.manifest: .*m.parquet has empty keys"),
    ],
    ids=["parquet without key", "csv without key", "duplicate key", "no images", "no shards", "empty key"],
)
def test_bad_manifests_are_refused_naming_the_manifest(assets, tmp_path, files, input_options, message, ray_session):
    for name, content in files.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, tmp_path / name)
        else:
            (tmp_path / name).write_text(content)
    (name,) = files
    config = job_config(
        assets, str(tmp_path), str(tmp_path / "out"), {}, manifest=str(tmp_path / name), **input_options
    )
    with pytest.raises(InputError, match=message):
        dry_run(config)


def test_a_key_in_two_manifest_files_is_refused_whichever_partition_it_lands_in(
    assets, tmp_path, ray_session, monkeypatch
):
    monkeypatch.setattr(pipeline.storage.manifest, "PIECE_ROWS", 100)  # a piece per file
    monkeypatch.setattr(pipeline.labelling.work, "PARTITION_ROWS", 50)  # 4 partitions
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for part in range(2):
        keys = [f"{part}-{i:03d}.jpg" for i in range(100)] + (["dup.jpg"] if part else [])
        pq.write_table(pa.table({"key": (["dup.jpg"] if not part else []) + keys}), manifests / f"{part}.parquet")
    config = job_config(assets, str(tmp_path / "data"), str(tmp_path / "out"), {}, manifest=str(manifests))
    with pytest.raises(InputError, match=r"^input.manifest: 1 duplicate key\(s\), e.g. 'dup.jpg'"):
        dry_run(config)
    assert not (tmp_path / "out").exists()


def test_a_manifest_takes_one_input_uri(assets, tmp_path):
    config = job_config(assets, [str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), {})
    config["input"]["manifest"] = str(tmp_path / "m.csv")
    with pytest.raises(ConfigError, match=r"^input: with input.manifest, input.uri is one URI"):
        load_config(config)
    with pytest.raises(InputError, match=r"input.manifest: .*missing does not exist"):
        plan(job_config(assets, str(tmp_path), str(tmp_path / "out"), {}, manifest=str(tmp_path / "missing")))
