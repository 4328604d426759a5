"""Session fixtures shared by the test suite: a real S3 API (moto's server on 127.0.0.1), a real local Ray,
and small random E2Style checkpoints from the model factory.

Environment is set at import time, before any fixture starts Ray: Ray workers inherit the driver's
environment when they start, and AWS credentials (any value, moto accepts all) must reach them.
"""
from __future__ import annotations

import logging
import os
import uuid

import pytest

for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_prestart_worker_first_driver": "0",
}.items():
    os.environ.setdefault(_k, _v)
# Never reach a real AWS account from tests, whatever the developer's shell holds.
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server on 127.0.0.1; yields its endpoint URL (http://127.0.0.1:PORT)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3fs_session(moto_server):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)


@pytest.fixture
def s3_bucket(moto_server, s3fs_session):
    """A fresh bucket per test; yields its name. The filesystem is ``s3fs_session``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs_session.mkdir(name)
    yield name


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once per session (5-7 s) and shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small random E2Style checkpoint in the official layout (resolution 64, 2 stages)."""
    from models.factory import write_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / "e2style_r64_s2.pt")
    write_checkpoint(path, resolution=64, stages=2, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint_other(tmp_path_factory):
    """Another small checkpoint (other seed): a run with it must not mix into an output of the first."""
    from models.factory import write_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt2") / "e2style_r64_s2_seed1.pt")
    write_checkpoint(path, resolution=64, stages=2, seed=1)
    return path


# ----------------------------------------------------------------------------------------------------
# Small synthetic datasets (tiny random images: enough for the pipeline's plumbing, alignment off)


def tiny_image_bytes(seed: int, fmt: str = "JPEG", size: int = 24, mode: str = "RGB") -> bytes:
    import io

    import numpy as np
    from PIL import Image

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
    import io
    import json
    import tarfile

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
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    from pipeline.config import resolve

    base = {"input": {"url": input_url}, "output": {"url": output_url},
            "model": {"checkpoint": checkpoint, "batch_size": 4}, "align": {"enabled": False},
            "storage": {"endpoint_url": endpoint}, "ray": {"chunk_size": 4}, "progress": False, "retries": 1}
    over: dict = {}
    for k, v in sets.items():
        cur = over
        parts = k.split("__")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = v
    return resolve(base, over)
