"""Read stage: listing and keys, each input format from local disk and from S3, error rows, skip_keys."""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline.labelling import InputConfig
from pipeline.labelling.plan import InputCount, count_inputs, pending_inputs
from pipeline.storage.formats import READ_SCHEMA, read_inputs
from pipeline.storage.listing import LISTING_SCHEMA, InputError, list_inputs
from pipeline.storage.retry import Retry


def png(shade: int) -> bytes:
    """A distinct 8x8 PNG per shade."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


@dataclass
class Store:
    """A folder on local disk or in the S3 test bucket."""

    root: str
    options: dict

    def uri(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def put(self, relative: str, data: bytes) -> None:
        fs, path = fsspec.core.url_to_fs(self.uri(relative), **self.options)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)

    def remove(self, relative: str) -> None:
        fs, path = fsspec.core.url_to_fs(self.uri(relative), **self.options)
        fs.rm_file(path)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "data"), {})
    bucket, options = request.getfixturevalue("s3_bucket")
    return Store(f"{bucket}/data", options)


def rows_by_key(dataset) -> dict[str, dict]:
    rows = dataset.take_all()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a key was read twice"
    return {row["key"]: row for row in rows}


def keys_of(store: Store, uri, fmt: str = "auto") -> list[str]:
    return list_inputs(InputConfig(uri=uri, format=fmt), store.options)["key"].to_pylist()


def read_all(config: InputConfig, options: dict, skip: set[str] = frozenset()):
    """The read stage over every listed input, skipping the keys in `skip`."""
    work = pending_inputs(list_inputs(config, options), pa.array(sorted(skip), pa.string()))
    loose = pc.equal(work["kind"], "images")
    shards, loose = (
        [ray.put(items)] if items.num_rows else [] for items in (work.filter(pc.invert(loose)), work.filter(loose))
    )
    return read_inputs(shards, loose, image_column=config.image_column, storage_options=options, retry=Retry(5))


def count(config: InputConfig, options: dict, skip: set[str]) -> InputCount:
    listing = list_inputs(config, options)
    return count_inputs(listing, config.image_column, options, retry=Retry(5), done=pa.array(sorted(skip), pa.string()))


def test_loose_files_in_nested_folders(store, ray_session):
    files = {"a.png": png(1), "sub/b.JPG": png(2), "sub/deep/c.webp": png(3), "sub/deep/gone.png": png(4)}
    for relative, data in files.items():
        store.put(relative, data)
    store.put("notes.txt", b"not an image")
    store.put("sub/.hidden.png", png(5))
    config = InputConfig(uri=store.root)

    assert count(config, store.options, {"a.png"}) == InputCount(4, 4, 1)
    dataset = read_all(config, store.options)
    store.remove("sub/deep/gone.png")  # listed, then gone before the read: an error row
    rows = rows_by_key(dataset)

    assert set(rows) == set(files)
    for key, data in files.items():
        assert rows[key]["source"].endswith(f"/data/{key}")
        assert rows[key]["source"].startswith("s3://" if store.root.startswith("s3://") else "file://")
        if key == "sub/deep/gone.png":
            assert rows[key]["bytes"] == b"" and "FileNotFoundError" in rows[key]["error"]
        else:
            assert rows[key]["bytes"] == data and rows[key]["error"] is None


def test_keys_for_globs_lists_and_formats(store):
    for relative in ["x/1.png", "x/2.png", "x/y/3.png", "z/4.png", "z/s.tar", "z/t.parquet"]:
        store.put(relative, b"")
    assert keys_of(store, store.uri("x/*.png")) == ["1.png", "2.png"]
    assert keys_of(store, store.uri("*/*.png")) == ["x/1.png", "x/2.png", "z/4.png"]
    assert keys_of(store, [store.uri("x/1.png"), store.uri("x/2.png")]) == ["1.png", "2.png"]
    assert keys_of(store, [store.uri("x/y"), store.uri("z/4.png")]) == ["x/y/3.png", "z/4.png"]
    assert keys_of(store, store.uri("z")) == ["4.png", "s.tar", "t.parquet"]
    assert keys_of(store, store.uri("z"), "webdataset") == ["s.tar"]
    assert keys_of(store, store.uri("z"), "images") == ["4.png"]
    with pytest.raises(InputError, match="duplicate key.*'1.png'"):
        keys_of(store, [store.uri("x"), store.uri("x/1.png")])
    with pytest.raises(InputError, match="no parquet files found"):
        keys_of(store, store.uri("x"), "parquet")
    with pytest.raises(InputError, match="does not exist"):
        keys_of(store, store.uri("nowhere"))


def test_webdataset_shards(store, ray_session):
    good = tar_bytes(
        [
            ("0001.jpg", png(1)),
            ("0001.cls", b"3"),
            ("0001.seg.png", png(9)),
            ("0002.png", png(2)),
            ("dir/0003.PNG", png(3)),
            ("./0004.png", png(4)),
            ("0002.png", png(99)),  # repeated name: the first copy counts
        ]
    )
    store.put("shards/000.tar", good)
    store.put("shards/001.tar", tar_bytes([("0001.png", png(5))]))
    store.put("shards/bad.tar", b"this is not a tar archive" * 40)
    truncated = tar_bytes([("0001.png", png(6)), ("0002.png", png(7) * 20)])
    store.put("shards/cut.tar", truncated[: 512 + 1024 + 700])  # member 1, then a broken member 2
    config = InputConfig(uri=store.root)
    skip = {"shards/000.tar/0002.png"}

    assert count(config, store.options, skip) == InputCount(4, 4 + 1 + 1 + 1, 1)
    rows = rows_by_key(read_all(config, store.options, skip))

    expected = {
        "shards/000.tar/0001.jpg": png(1),
        "shards/000.tar/dir/0003.PNG": png(3),
        "shards/000.tar/0004.png": png(4),
        "shards/001.tar/0001.png": png(5),
        "shards/cut.tar/0001.png": png(6),
    }
    assert set(rows) == set(expected) | {"shards/bad.tar", "shards/cut.tar"}
    for key, data in expected.items():
        assert (rows[key]["bytes"], rows[key]["error"]) == (data, None)
        assert rows[key]["source"].endswith(f"/data/{key[: key.index('.tar') + 4]}")
    for shard in ["shards/bad.tar", "shards/cut.tar"]:
        assert rows[shard]["error"].startswith("unreadable shard: ") and rows[shard]["bytes"] == b""


def test_parquet_shards_raw_bytes_and_hf_struct(store, ray_session):
    raw = pa.table({"image": pa.array([png(i) for i in range(5)], pa.binary()), "label": list(range(5))})
    store.put("pq/raw.parquet", parquet_bytes(raw, row_group_size=2))
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": png(10), "path": "a.png"},
                    {"bytes": None, "path": "b.png"},
                    {"bytes": png(12), "path": None},
                ],
                hf_type,
            )
        }
    )
    store.put("pq/nested/hf.parquet", parquet_bytes(hf, row_group_size=10))
    store.put("pq/other.parquet", parquet_bytes(pa.table({"pixels": [b"x"]}), row_group_size=10))
    config = InputConfig(uri=store.uri("pq"), format="parquet")
    skip = {"raw.parquet/0", "raw.parquet/1", "raw.parquet/3"}  # row group 0 entirely, one row of group 1

    assert count(config, store.options, skip) == InputCount(3, 5 + 3 + 1, 3)
    rows = rows_by_key(read_all(config, store.options, skip))

    assert set(rows) == {
        "raw.parquet/2",
        "raw.parquet/4",
        "nested/hf.parquet/0",
        "nested/hf.parquet/1",
        "nested/hf.parquet/2",
        "other.parquet",
    }
    assert rows["raw.parquet/2"]["bytes"] == png(2) and rows["raw.parquet/4"]["bytes"] == png(4)
    assert rows["nested/hf.parquet/0"]["bytes"] == png(10) and rows["nested/hf.parquet/2"]["bytes"] == png(12)
    assert rows["nested/hf.parquet/1"]["error"] == "image is a path-only image ('b.png'), not image bytes"
    assert "no column 'image'" in rows["other.parquet"]["error"]
    assert rows["raw.parquet/2"]["source"].endswith("/data/pq/raw.parquet")


def test_skip_keys_drop_loose_files_before_reading(tmp_path, ray_session):
    store = Store(str(tmp_path), {})
    for i in range(3):
        store.put(f"{i}.png", png(i))
    config = InputConfig(uri=store.root)
    assert set(rows_by_key(read_all(config, {}, {"0.png", "2.png"}))) == {"1.png"}
    everything_done = read_all(config, {}, {"0.png", "1.png", "2.png"})
    assert everything_done.count() == 0 and everything_done.schema().names == READ_SCHEMA.names


def test_shard_rows_carry_the_shard_image_count(store, ray_session):
    members = [(f"{i:04d}.png", png(i)) for i in range(5)] + [("0001.cls", b"3")]
    store.put("a.tar", tar_bytes(members))
    store.put("b.parquet", parquet_bytes(pa.table({"image": pa.array([png(i) for i in range(3)], pa.binary())}), 2))
    config = InputConfig(uri=store.root)

    rows = rows_by_key(read_all(config, store.options, {"a.tar/0004.png"}))  # the last member done before
    counts = {key: row["shard_images"] for key, row in rows.items()}
    assert counts == {
        "a.tar/0000.png": 0,
        "a.tar/0001.png": 0,
        "a.tar/0002.png": 0,
        "a.tar/0003.png": 5,
        "b.parquet/0": 3,
        "b.parquet/1": 3,
        "b.parquet/2": 3,
    }


def test_pending_inputs_drop_finished_shards_and_done_files():
    listing = pa.table(
        {
            "key": ["a.jpg", "b.jpg", "dir.tar/x/0.jpg", "s.tar", "t.parquet", "u.tar"],
            "source": [
                "file:///d/a.jpg",
                "file:///d/b.jpg",
                "file:///d/dir.tar/x/0.jpg",
                "file:///d/s.tar",
                "file:///d/t.parquet",
                "file:///d/u.tar",
            ],
            "kind": ["images", "images", "images", "webdataset", "parquet", "webdataset"],
        },
        schema=LISTING_SCHEMA,
    )
    done = pa.array(
        sorted(
            [
                "a.jpg",
                "dir.tar/x/0.jpg",
                "s.tar/0.jpg",
                "s.tar/d/1.jpg",
                "t.parquet/0",
                "t.parquet/1",
                "u.tar/0.jpg",
                "gone.tar/0.jpg",
            ]
        )
    )
    images = pa.table({"shard": ["s.tar", "t.parquet", "u.tar"], "images": pa.array([2, 3, 1], pa.int64())})

    work = pending_inputs(listing, done, images).to_pylist()
    assert [(item["key"], sorted(item["skip"])) for item in work] == [
        ("t.parquet", ["t.parquet/0", "t.parquet/1"]),  # 2 of its 3 rows done: read, passing over them
        ("b.jpg", []),
    ]  # s.tar and u.tar have every image done: not opened; done loose files dropped
    unknown_count = pending_inputs(listing, done).to_pylist()  # without counts, no shard can be known finished
    assert [item["key"] for item in unknown_count] == ["s.tar", "t.parquet", "u.tar", "b.jpg"]


def test_listing_errors_name_the_key_the_user_set(tmp_path):
    """A URI that does not exist, a folder with no inputs, and one folder given twice (its keys twice): each error
    starts with the key the URI was given under (the job's input.uri, training's data.uri, select-prompts' POOL_URI,
    evaluate's --truth, which takes one URI)."""
    from pipeline.results.evaluate import Truth
    from pipeline.storage.pairs import LabelledSource

    empty, images = tmp_path / "empty", tmp_path / "images"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "x.jpg")
    cases = [
        (str(tmp_path / "nope"), "does not exist"),
        (str(empty), "no image, .tar or .parquet files found in"),
        ((str(images), str(images)), "1 duplicate key(s), e.g. 'x.jpg'"),
    ]
    listers = {
        "input.uri": (lambda uri: list_inputs(InputConfig(uri=uri), {}), cases),
        "data.uri": (lambda uri: list_inputs(LabelledSource(uri), {}), cases),
        "POOL_URI": (lambda uri: list_inputs(LabelledSource(uri, config_key="POOL_URI"), {}), cases),
        "--truth": (lambda uri: Truth(uri, {}, mask_field="seg.png", mask_column="mask", classes=["x"]), cases[:2]),
    }
    for key, (lister, key_cases) in listers.items():
        for uri, problem in key_cases:
            with pytest.raises(InputError) as caught:
                lister(list(uri) if isinstance(uri, tuple) else uri)
            assert str(caught.value).startswith(f"{key}: ") and problem in str(caught.value), (key, uri)
