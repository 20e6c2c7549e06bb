"""`export` writes outputs of `--rows` rows of hand-drawn class maps and exports each to every format in a fresh
process: seconds and peak RSS, to show that memory stays flat as the output grows.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs.benchmark.harness import finish_parser, in_child, peak_kib, write_record


def _export_output(folder: Path, rows: int, side: int) -> str:
    """A job output of `rows` ok rows, each a `side`-square class map of four random rectangles and discs, and an
    image per row (`source`, which `yolo-seg` copies)."""
    from model.processing import build_palette, encode_png
    from pipeline.labelling.write import LabelWriter
    from pipeline.storage.output import write_job_files

    uri, images = str(folder / f"out-{rows}"), folder / f"images-{rows}"
    images.mkdir()
    picture = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(picture, format="JPEG")
    writer, palette = LabelWriter(uri, {}, png=False), build_palette(2)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for start in range(0, rows, 256):
        batch = []
        for i in range(start, min(rows, start + 256)):
            labels = np.zeros((side, side), np.uint8)
            for class_id in (1, 1, 2, 2):
                y, x, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(4, side // 6))]
                if class_id == 1:
                    labels[y : y + r, x : x + 2 * r] = 1
                else:
                    labels[np.hypot(yy - y, xx - x) <= r] = 2
            counts = np.bincount(labels.ravel(), minlength=3)
            (images / f"{i:07d}.jpg").write_bytes(picture.getvalue())
            batch.append(
                {
                    "key": f"{i // 1000:03d}/{i:07d}.jpg",
                    "source": str(images / f"{i:07d}.jpg"),
                    "status": "ok",
                    "error": None,
                    "width": side,
                    "height": side,
                    "mask": encode_png(labels, palette),
                    "class_ids": np.flatnonzero(counts).tolist(),
                    "pixel_counts": counts[counts > 0].tolist(),
                    "class_scores": [0.5] * int((counts > 0).sum()),
                    "score": 0.5,
                    "model": "m",
                    "prompt_set": "p",
                    "labeled_at": datetime.now(timezone.utc),
                    "shard_images": None,
                }
            )
        writer(pa.Table.from_pylist(batch))
    write_job_files(uri, {}, {"classes": ["background", "bar", "disc"]}, success=True)
    return uri


def _measured_export(uri: str, fmt: str, to: str) -> dict:
    """Export in this (child) process: seconds and peak RSS."""
    from pipeline.results.export import export

    start = time.perf_counter()
    summary = export(uri, fmt, to=to, log=lambda line: None)
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_kib() / 1024, "regions": summary.regions}


def benchmark_export(args: argparse.Namespace) -> None:
    """`export` at each --rows: time and peak memory of the exporting process, per format."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            uri = _export_output(Path(tmp), rows, args.side)
            for fmt in args.formats:
                results[f"{fmt} {rows}"] = in_child(_measured_export, uri, fmt, f"{tmp}/export-{fmt}-{rows}")
    print(f"{'format, rows':<22}{'seconds':>10}{'peak RSS (MiB)':>16}{'regions':>10}")
    for name, result in results.items():
        print(f"{name:<22}{result['seconds']:>10.1f}{result['peak_mib']:>16.0f}{result['regions']:>10}")
    write_record(args.json, {"benchmark": "export", **vars(args), "results": results})


def add_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `export` subcommand."""
    parser = sub.add_parser(
        "export", help="export at several sizes: time and peak memory per format", description=__doc__
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--side", type=int, default=256, help="class maps of side x side pixels")
    parser.add_argument("--formats", nargs="+", default=["coco", "yolo-seg", "masks"])
    return finish_parser(parser, benchmark_export)
