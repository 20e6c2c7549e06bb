"""The one reader of datasets (`pipeline.storage.formats`) under the labelled pairs: a Parquet shard is streamed (memory
flat on a 1 GB shard), and a read cut off mid-shard by a storage outage is re-opened and gives every pair once."""

from __future__ import annotations

import io
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image
from test_read import tar_bytes

from pipeline.storage.pairs import LabelledSource, labelled_pairs, read_pairs
from pipeline.storage.retry import Retry

REPO = Path(__file__).resolve().parent.parent

# In a fresh process: stream the pairs of one Parquet shard and print how far the peak RSS grew while doing so.
_STREAM_PAIRS = """
import json, sys
import pyarrow as pa
from pipeline.storage.pairs import LabelledSource, read_pairs

def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

uri = sys.argv[1]
items = pa.table({"key": ["big.parquet"], "kind": ["parquet"], "source": [uri],
                  "mask_source": pa.nulls(1, pa.string())})
before = peak_kib()
pairs = image_bytes = 0
for pair in read_pairs(items, LabelledSource(uri), {}):
    assert not pair["error"], pair["error"]
    pairs, image_bytes = pairs + 1, image_bytes + len(pair["image"])
print(json.dumps({"pairs": pairs, "image_bytes": image_bytes, "grown_mib": (peak_kib() - before) / 1024}))
"""


def test_pairs_of_a_1_gb_parquet_shard_are_streamed_in_flat_memory(tmp_path):
    rows, image_size, group_rows = 1024, 1 << 20, 32  # 1 GiB of incompressible images in row groups of 32 MiB
    shard = tmp_path / "big.parquet"
    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.binary()), ("mask", pa.binary())])
    with pq.ParquetWriter(shard, schema, compression="none") as writer:
        for _ in range(rows // group_rows):
            images = [rng.bytes(image_size) for _ in range(group_rows)]
            writer.write_table(pa.table({"image": images, "mask": [b"\x01" * 64] * group_rows}, schema=schema))
    assert shard.stat().st_size > 1 << 30

    child = subprocess.run(
        [sys.executable, "-c", _STREAM_PAIRS, str(shard)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.returncode == 0, child.stderr
    read = json.loads(child.stdout)
    assert (read["pairs"], read["image_bytes"]) == (rows, rows * image_size)
    assert read["grown_mib"] < 300, read  # a whole-shard read grows by more than the shard's 1024 MiB


class CuttingProxy:
    """A TCP proxy in front of the S3 server. Once armed, after `after_bytes` more bytes of responses it drops every
    open connection and refuses new ones for `outage_s`."""

    def __init__(self, target: tuple[str, int], outage_s: float = 2.0) -> None:
        self.target, self.outage_s = target, outage_s
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.left: int | None = None  # bytes to pass before the cut; None: not armed
        self.down_until = 0.0
        self.cuts = 0
        proxy = self

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.forward(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def arm(self, after_bytes: int) -> None:
        with self.lock:
            self.left = after_bytes

    def forward(self, client: socket.socket) -> None:
        if time.monotonic() < self.down_until:
            return  # closed at once: the store is unreachable
        upstream = socket.create_connection(self.target)
        with self.lock:
            self.open |= {client, upstream}
        pumps = [
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        with self.lock:
            self.open -= {client, upstream}

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if response:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            _shut(source, sink)

    def _count(self, sent: int) -> None:
        with self.lock:
            if self.left is None:
                return
            self.left -= sent
            if self.left > 0:
                return
            self.left, self.down_until, self.cuts = None, time.monotonic() + self.outage_s, self.cuts + 1
            _shut(*self.open)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _shut(*ends: socket.socket) -> None:
    for end in ends:
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def put_shard(layout: str, fs: fsspec.AbstractFileSystem, folder: str, count: int) -> tuple[str, dict[str, bytes]]:
    """A shard of `count` pairs of noise images (12 KB each) and label maps; returns its URI and the images by key."""
    rng = np.random.default_rng(1)
    images = [png(rng.integers(0, 256, (64, 64, 3), np.uint8)) for _ in range(count)]
    masks = [png(rng.integers(0, 3, (64, 64), np.uint8)) for _ in range(count)]
    if layout == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"image": images, "mask": masks}), sink, row_group_size=16)
        name, data = "pairs.parquet", sink.getvalue().to_pybytes()
        keys = [f"{name}/{i}" for i in range(count)]
    else:
        members = [
            member for i in range(count) for member in ((f"{i:04d}.jpg", images[i]), (f"{i:04d}.seg.png", masks[i]))
        ]
        name, data = "pairs.tar", tar_bytes(members)
        keys = [f"{name}/{i:04d}.jpg" for i in range(count)]
    fs.pipe_file(f"{folder}/{name}", data)
    return f"s3://{folder}/{name}", dict(zip(keys, images))


@pytest.mark.parametrize("layout", ["parquet", "webdataset"])
def test_a_labelled_read_cut_off_mid_shard_gives_every_pair_once(s3_bucket, layout, monkeypatch):
    """The S3 client retries nothing itself (botocore's `max_attempts: 1`, s3fs's `retries`), so that the cut reaches
    the reader, as a longer outage would."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    uri, images = put_shard(layout, fs, f"{bucket.removeprefix('s3://')}/data", count=200)
    host, port = options["client_kwargs"]["endpoint_url"].removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)))
    reader = {
        **options,
        "client_kwargs": {"endpoint_url": proxy.endpoint},
        "skip_instance_cache": True,
        "default_block_size": 256 << 10,  # the shard is fetched in many ranges, so that one is cut
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 1},
    }
    source = LabelledSource(uri, image_column="image", mask_column="mask", mask_field="seg.png")
    half = fs.size(uri) // 2
    try:
        items = labelled_pairs(source, reader, num_classes=2)

        time.sleep(proxy.outage_s)
        proxy.arm(half)
        cut_once = list(read_pairs(items, source, reader, retry=Retry(0)))  # without retries ...
        assert proxy.cuts == 1 and cut_once[-1]["error"].startswith("unreadable: ")  # ... the rest of the shard is lost
        assert 0 < len(cut_once) - 1 < len(images)

        time.sleep(proxy.outage_s)
        proxy.arm(half)
        started = time.monotonic()
        pairs = list(read_pairs(items, source, reader, retry=Retry(30)))
    finally:
        proxy.close()
    assert proxy.cuts == 2 and time.monotonic() - started > proxy.outage_s  # cut mid-shard, and the outage ridden out
    assert [pair["key"] for pair in pairs] == list(images)  # every pair once, in order
    assert all(pair["error"] == "" and pair["image"] == images[pair["key"]] and pair["mask"] for pair in pairs)
