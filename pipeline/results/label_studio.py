"""The `label-studio` export: Label Studio pre-annotations (`tasks.json`) and the project's labelling interface
(`labeling_config.xml`); see `pipeline.results.export`. Regions are `brushlabels` in Label Studio's brush RLE
(`brush_rle`)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import fsspec
import numpy as np

from pipeline.results.writing import ExportError, Region, append_record, copy_spool, image_extension, put_file
from pipeline.storage.formats import read_images
from pipeline.storage.listing import SHARD_MEMBER_KEY
from pipeline.storage.output import key_path

_RLE_SIZES = (3, 4, 8, 16)  # bits of a run's length field, chosen per run by a 2-bit selector (rle-pack)


class LabelStudioWriter:
    """`tasks.json` (spooled to a local file, then written) and `labeling_config.xml`; the images of shards' members
    copied to `images/`."""

    def __init__(
        self,
        target: str,
        names: list[str],
        palette: list[list[int]],
        kept: list[int],
        name_of: Callable[[str], str],
        local_files_root: str | None,
        image_column: str,
        options: dict[str, Any],
    ) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        self.names, self.name_of, self.image_column, self.options = names, name_of, image_column, options
        self.local_root = None if local_files_root is None else os.path.abspath(local_files_root).rstrip("/")
        self.spool = tempfile.TemporaryFile("w+")
        labels = "".join(
            f"    <Label value={quoteattr(names[cid])}"
            + (f' background="#{bytes(palette[cid]).hex()}"' if cid < len(palette) else "")
            + "/>\n"
            for cid in kept
        )
        config = (
            '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="label" toName="image">\n{labels}  </BrushLabels>\n</View>\n'
        )
        put_file(self.fs, f"{self.root}/labeling_config.xml", config.encode())

    def add(self, row: dict[str, Any], shape: tuple[int, int], regions: list[Region]) -> None:
        height, width = shape
        scores = dict(zip(row["class_ids"] or [], row.get("class_scores") or []))
        results = []
        for number, region in enumerate(regions):
            result = {
                "id": f"r{number}",
                "from_name": "label",
                "to_name": "image",
                "type": "brushlabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": brush_rle(region.full(shape)),
                    "brushlabels": [self.names[region.class_id]],
                },
            }
            if region.class_id in scores:
                result["score"] = scores[region.class_id]
            results.append(result)
        prediction = {"model_version": row["model"], "result": results}
        if row["score"] is not None:
            prediction["score"] = row["score"]
        task = {"data": {"image": self._url(row), "key": row["key"]}, "predictions": [prediction]}
        append_record(self.spool, task)

    def close(self) -> None:
        with self.fs.open(f"{self.root}/tasks.json", "w") as out:
            out.write("[")
            copy_spool(self.spool, out)
            out.write("]\n")
        self.spool.close()

    def _url(self, row: dict[str, Any]) -> str:
        """The image's URL as Label Studio reads it; a shard member's image is copied to `images/` first."""
        source = row["source"]
        if re.match(SHARD_MEMBER_KEY, row["key"]):
            item = {"key": row["key"], "source": source}
            data = read_images([item], image_column=self.image_column, storage_options=self.options).get(row["key"])
            if data is None:
                raise ExportError(f"{source}: the image of {row['key']} cannot be read")
            path = f"{self.root}/images/{key_path(self.name_of(row['key']), image_extension(row['key'], data))}"
            put_file(self.fs, path, data)
            source = self.fs.unstrip_protocol(path)
        protocol, path = fsspec.core.split_protocol(source)
        if self.local_root is not None and protocol in (None, "file", "local"):
            if not path.startswith(self.local_root + "/"):
                raise ExportError(f"--local-files-root: {source} is not under {self.local_root}")
            return f"/data/local-files/?d={quote(path[len(self.local_root) + 1 :])}"
        return source


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of an (H, W) bool mask: the mask's RGBA bytes (255 inside, 0 outside), row by row,
    packed as repeated runs in the rle-pack format Label Studio decodes (a 32-bit count, 5 bits of word size less one,
    four 4-bit run-length sizes less one; then per run a 1 bit, a 2-bit size choice, the length less one and the
    8-bit value; most significant bit first, zero-padded to whole bytes)."""
    flat = mask.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [flat.size]])
    bits = [f"{flat.size * 4:032b}", f"{8 - 1:05b}", *(f"{size - 1:04b}" for size in _RLE_SIZES)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        value, left = 255 if flat[start] else 0, (end - start) * 4
        while left:
            run = min(left, 1 << _RLE_SIZES[-1])
            choice = next(i for i, size in enumerate(_RLE_SIZES) if run - 1 < 1 << size)
            bits.append(f"1{choice:02b}{run - 1:0{_RLE_SIZES[choice]}b}{value:08b}")
            left -= run
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))
