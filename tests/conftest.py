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


def pytest_collection_modifyitems(config, items):
    """The ``ray`` mark is written on each test that starts Ray, where a reader sees it; a test that uses
    ``ray_session`` without it would run in ``make test-unit``, so collection stops and names it."""
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("these tests use ray_session without @pytest.mark.ray (add it, or a module-level "
                                "pytestmark): " + ", ".join(unmarked))


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
