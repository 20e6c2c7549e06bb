"""Write stage and resume index: labels/ and masks/ on local disk and S3, one table for pyarrow/pandas/DuckDB,
cleaning that keeps each key once."""

from __future__ import annotations

import io
import itertools
import json
from datetime import datetime, timedelta, timezone

import duckdb
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from PIL import Image

from pipeline.labelling.work import RunKeys, list_labels, settle_labels
from pipeline.labelling.write import LabelWriter
from pipeline.storage.output import LABELS_SCHEMA, RAN_COLUMNS, labels_file_name, prepare_output, write_job_files
from pipeline.storage.retry import Retry

START = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
MODEL, PROMPT_SET = "seggpt-test", "prompts-test"


def mask_png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8), shade % 3).save(buffer, format="PNG")
    return buffer.getvalue()


def result(key: str, ok: bool = True, at: datetime = START) -> dict:
    """A result row as the postprocess stage would give it."""
    shade = sum(map(ord, key))
    return {
        "key": key,
        "source": f"s3://inputs/{key}",
        "status": "ok" if ok else "error",
        "error": None if ok else "UnidentifiedImageError: cannot identify image file",
        "width": 8 if ok else None,
        "height": 8 if ok else None,
        "mask": mask_png(shade) if ok else None,
        "class_ids": [0, 1] if ok else [],
        "pixel_counts": [40, 24] if ok else [],
        "class_scores": [0.875, 0.5] if ok else [],
        "score": 0.75 if ok else None,
        "model": MODEL,
        "prompt_set": PROMPT_SET,
        "labeled_at": at,
        "shard_images": None,
    }


def batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", options


def label_files(uri: str, options: dict) -> list[str]:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.invalidate_cache()
    return sorted(fs.find(f"{root}/labels"))


def read_labels(uri: str, options: dict) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.invalidate_cache()
    return pq.read_table(f"{root}/labels", filesystem=fs)


def assert_each_key_once(uri: str, options: dict, keys: set[str], status: str = "ok") -> None:
    table = read_labels(uri, options)
    assert sorted(table["key"].to_pylist()) == sorted(keys)
    assert set(table["status"].to_pylist()) == {status}


def clean(uri: str, options: dict) -> set[str]:
    """Run the cleaning on the output as it is (over 3 partitions, nothing merged); returns the keys done (ok)
    afterwards."""
    fs, root = fsspec.core.url_to_fs(uri, **options)
    earlier = list_labels(fs, root)
    settle_labels(fs, root, earlier, RunKeys(MODEL, PROMPT_SET, "input.uri"), 3, 0, Retry(5))
    return done(uri, options)


def done(uri: str, options: dict) -> set[str]:
    """The keys with an ok row of MODEL and PROMPT_SET."""
    if not fsspec.core.url_to_fs(uri, **options)[0].exists(f"{uri}/labels"):
        return set()
    rows = read_labels(uri, options).to_pylist()
    return {
        row["key"] for row in rows if row["status"] == "ok" and (row["model"], row["prompt_set"]) == (MODEL, PROMPT_SET)
    }


def test_labels_read_back_as_one_table(output):
    uri, options = output
    writer = LabelWriter(uri, options, png=True)
    mixed = [result("a.jpg"), result("dir/b.png"), result("c.jpg", ok=False)]
    errors_only = [result("shard.tar/0001.jpg", ok=False), result("d.jpg", ok=False)]
    unsaid = dict.fromkeys(RAN_COLUMNS)  # these rows do not say what the model ran with
    assert writer(batch(mixed)).to_pylist() == [  # ok rows and error rows go to files of their own
        {"file": labels_file_name(["a.jpg", "dir/b.png"]), "rows": 2, "ok": 2, **unsaid},
        {"file": labels_file_name(["c.jpg"]), "rows": 1, "ok": 0, **unsaid},
    ]
    writer(batch(errors_only))

    files = label_files(uri, options)
    assert len(files) == 3 and all(file.rsplit("/", 1)[1].startswith("part-") for file in files)
    fs, root = fsspec.core.url_to_fs(uri, **options)
    for file in files:
        with fs.open(file, "rb") as handle:
            assert pq.read_schema(handle).remove_metadata() == LABELS_SCHEMA.remove_metadata()

    table = read_labels(uri, options)
    assert table.num_rows == 5 and table.schema.remove_metadata() == LABELS_SCHEMA.remove_metadata()
    frame = pd.read_parquet(f"{uri}/labels", storage_options=options or None)
    assert sorted(frame["key"]) == sorted(table["key"].to_pylist())
    assert str(frame["labeled_at"].dtype) == "datetime64[us, UTC]"
    connection = duckdb.connect()
    if options:
        connection.register_filesystem(fsspec.filesystem("s3", **options))
    counts = connection.sql(
        f"select status, count(*), count(mask_uri) from read_parquet('{uri}/labels/*.parquet') group by 1 order by 1"
    ).fetchall()
    assert counts == [("error", 3, 0), ("ok", 2, 2)]

    rows = {row["key"]: row for row in table.to_pylist()}
    for key in ["a.jpg", "dir/b.png"]:
        assert rows[key]["mask_uri"] == fs.unstrip_protocol(f"{root}/masks/{key}.png")
        assert fs.cat_file(f"{root}/masks/{key}.png") == rows[key]["mask"] == result(key)["mask"]
        assert rows[key]["labeled_at"] == START and rows[key]["class_ids"] == [0, 1]
    assert rows["d.jpg"]["mask"] is None and rows["d.jpg"]["width"] is None
    assert not fs.exists(f"{root}/masks/c.jpg.png")


def test_retried_write_of_a_batch_leaves_one_file(output):
    uri, options = output
    rows = [result(f"{i}.jpg") for i in range(4)]
    LabelWriter(uri, options, png=False)(batch(rows))
    LabelWriter(uri, options, png=False)(batch(rows[::-1]))  # a retry may see the rows in another order
    files = label_files(uri, options)
    fs, root = fsspec.core.url_to_fs(uri, **options)
    assert not fs.exists(f"{root}/masks") and read_labels(uri, options)["mask_uri"].null_count == 4
    assert [file.rsplit("/", 1)[1] for file in files] == [labels_file_name(f"{i}.jpg" for i in range(4))]
    assert_each_key_once(uri, options, {f"{i}.jpg" for i in range(4)})


def test_ray_map_batches_writes_every_row_once(tmp_path, ray_session):
    uri = str(tmp_path / "out")
    rows = [result(f"img-{i:02d}.jpg", ok=i % 5 != 0) for i in range(20)]
    for row in rows:
        row["labeled_at"] = row["labeled_at"].isoformat()  # ISO strings are accepted too
    written = (
        ray.data.from_items(rows, override_num_blocks=3)
        .map_batches(
            LabelWriter,
            fn_constructor_args=(uri, {}),
            batch_size=4,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
        .take_all()
    )
    assert sum(row["rows"] for row in written) == 20 and sum(row["ok"] for row in written) == 16
    table = read_labels(uri, {})
    assert sorted(table["key"].to_pylist()) == sorted(row["key"] for row in rows)
    assert table["status"].to_pylist().count("error") == 4
    assert set(table["labeled_at"].to_pylist()) == {START}
    assert sorted(file.rsplit("/", 1)[1] for file in label_files(uri, {})) == sorted(row["file"] for row in written)


def test_relabelled_error_rows_leave_each_key_once(output, ray_session):
    uri, options = output
    keys = [f"{i}.jpg" for i in range(6)]
    writer = LabelWriter(uri, options)
    writer(batch([result(key, ok=key not in {"1.jpg", "4.jpg"}) for key in keys[:3]]))
    writer(batch([result(key, ok=key != "4.jpg") for key in keys[3:]]))
    assert done(uri, options) == set(keys) - {"1.jpg", "4.jpg"}
    big_files = set(label_files(uri, options)) - {
        f"{fsspec.core.url_to_fs(uri, **options)[1]}/labels/{labels_file_name([key])}" for key in ["1.jpg", "4.jpg"]
    }

    later = START + timedelta(hours=1)
    writer(batch([result(key, at=later) for key in ["1.jpg", "4.jpg"]]))  # the resumed run relabels them
    assert clean(uri, options) == set(keys)
    assert_each_key_once(uri, options, set(keys))
    assert big_files <= set(label_files(uri, options))  # only the small error files were removed
    assert done(uri, options) == set(keys)


def test_error_rows_stay_until_relabelled_and_duplicates_keep_the_latest(tmp_path, ray_session):
    uri = str(tmp_path / "out")
    writer = LabelWriter(uri, {})
    writer(batch([result("a.jpg", ok=False), result("b.jpg")]))
    writer(batch([result("a.jpg", ok=False, at=START + timedelta(1)), result("c.jpg")]))  # "a.jpg" twice
    assert clean(uri, {}) == {"b.jpg", "c.jpg"}
    rows = {row["key"]: row for row in read_labels(uri, {}).to_pylist()}
    assert sorted(rows) == ["a.jpg", "b.jpg", "c.jpg"]
    assert rows["a.jpg"]["status"] == "error" and rows["a.jpg"]["labeled_at"] == START + timedelta(1)


def test_rows_of_this_model_win_over_newer_rows_of_another(tmp_path, ray_session):
    uri = str(tmp_path / "out")
    writer = LabelWriter(uri, {})
    writer(batch([result("a.jpg"), result("b.jpg")]))
    newer_other_model = [{**result("a.jpg", at=START + timedelta(1)), "model": "another"}]
    writer(batch(newer_other_model))
    assert clean(uri, {}) == {"a.jpg", "b.jpg"}
    rows = {row["key"]: row for row in read_labels(uri, {}).to_pylist()}
    assert sorted(rows) == ["a.jpg", "b.jpg"] and rows["a.jpg"]["model"] == MODEL


def key_set(prefix: str, new_file_sorts_first: bool) -> list[str]:
    """Three keys whose labels file name sorts after (or before) that of their first two."""
    for n in itertools.count():
        keys = [f"{prefix}{n}-{i}.jpg" for i in range(3)]
        if (labels_file_name(keys[:2]) < labels_file_name(keys)) == new_file_sorts_first:
            return keys


@pytest.mark.parametrize("new_file_sorts_first", [True, False])
def test_resume_after_a_kill_inside_the_cleaning(output, ray_session, new_file_sorts_first):
    """Killed after the cleaned copy of a file was written but before the old file was deleted."""
    uri, options = output
    a, b, c = key_set("k", new_file_sorts_first)
    writer = LabelWriter(uri, options)
    writer(batch([result(a), result(b), result(c)]))
    writer(batch([result("other.jpg")]))
    writer(batch([result(c, at=START + timedelta(1))]))  # c relabelled: the old file must lose it
    writer(batch([result(a), result(b)]))  # exactly what the cleaning writes first for that file
    assert len(label_files(uri, options)) == 4

    assert clean(uri, options) == {a, b, c, "other.jpg"}
    assert_each_key_once(uri, options, {a, b, c, "other.jpg"})
    files = label_files(uri, options)
    assert clean(uri, options) == {a, b, c, "other.jpg"}  # again: no change
    assert label_files(uri, options) == files
    rows = {row["key"]: row for row in read_labels(uri, options).to_pylist()}
    assert rows[c]["labeled_at"] == START + timedelta(1)


def test_job_files_and_starting_over(output):
    uri, options = output
    fs, root = fsspec.core.url_to_fs(uri, **options)
    LabelWriter(uri, options)(batch([result("a.jpg")]))
    write_job_files(uri, options, {"counts": {"ok": 1}, "started": START}, success=False)
    assert json.loads(fs.cat_file(f"{root}/_job.json")) == {"counts": {"ok": 1}, "started": str(START)}
    assert not fs.exists(f"{root}/_SUCCESS")
    write_job_files(uri, options, {"counts": {"ok": 1}}, success=True)
    fs.invalidate_cache()
    assert fs.exists(f"{root}/_SUCCESS")
    names = {path.rsplit("/", 1)[1] for path in fs.ls(root, detail=False)}
    assert names - {"_staging"} == {"_SUCCESS", "_job.json", "labels", "masks"}
    assert fs.find(f"{root}/_staging") == []  # no staging leftovers

    prepare_output(fs, root, resume=False)
    fs.invalidate_cache()
    assert not any(fs.exists(f"{root}/{name}") for name in ["_SUCCESS", "labels", "masks"])
    assert done(uri, options) == set()
