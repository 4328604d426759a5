"""Small synthetic inputs for the pipeline's tests: tiny random images (enough for the plumbing, alignment
off), WebDataset shards and Parquet files holding them, and a resolved test config."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import resolve


def tiny_image_bytes(seed: int, fmt: str = "JPEG", size: int = 24, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_tar(samples: dict[str, bytes], with_meta: bool = True, extra: list[tuple[str, bytes]] | None = None) -> bytes:
    """img2dataset-style WebDataset shard: <key>.jpg, <key>.json, <key>.txt per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for key, data in samples.items():
            add(f"{key}.jpg", data)
            if with_meta:
                add(f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                add(f"{key}.txt", f"caption of {key}".encode())
        for name, data in extra or []:
            add(name, data)
    return buf.getvalue()


def make_parquet(samples: dict[str, bytes], style: str = "img2dataset") -> bytes:
    """A Parquet file with image bytes: img2dataset's ``jpg`` column, or Hugging Face's ``image`` struct."""
    keys = list(samples)
    if style == "img2dataset":
        table = pa.table({"key": keys, "jpg": pa.array(list(samples.values()), pa.binary()),
                          "caption": [f"c{k}" for k in keys]})
    else:
        structs = [{"bytes": v, "path": f"{k}.jpg"} for k, v in samples.items()]
        table = pa.table({"id": keys, "image": pa.array(structs, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=3)
    return sink.getvalue().to_pybytes()


def pipeline_config(input_url: str, output_url: str, checkpoint: str, endpoint: str | None = None, **sets) -> dict:
    """A resolved (typed, frozen) config for tests: alignment off, no progress bar; ``sets`` uses '__' for dots."""
    base = {"input": {"url": input_url}, "output": {"url": output_url},
            "model": {"checkpoint": checkpoint, "batch_size": 4}, "align": {"enabled": False},
            "storage": {"endpoint_url": endpoint}, "ray": {"chunk_size": 4}, "progress": False, "retries": 1}
    return resolve(base, nested_overrides(sets))


def nested_overrides(sets: dict) -> dict:
    """Keyword overrides with '__' for dots (``model__batch_size=2``) as the nested mapping configs merge."""
    over: dict = {}
    for key, value in sets.items():
        cur = over
        parts = key.split("__")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
    return over
