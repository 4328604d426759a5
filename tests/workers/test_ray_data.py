"""Inversion from a user's own code: the Ray Data entry point (workers.ray_data.InvertPhotos under a real
``ray.data`` map_batches) and the Python API for photos in memory (pipeline.photo_inversion.PhotoInverter) give
the pipeline's own rows for the same photographs: the same statuses, the same codes."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers.inputs import pipeline_config
from helpers.paths import DATA_DIR, REPO_ROOT
from pipeline.config import AlignConfig
from pipeline.decode import decode_image
from pipeline.photo_inversion import PhotoInverter
from pipeline.runner import run
from workers.ray_data import InvertPhotos

DEMO_CHECKPOINT = os.path.join(REPO_ROOT, "demo", "e2style_demo.pt")
PHOTOS = ("astronaut.jpg", "china.jpg", "grace_hopper.jpg")   # two faces and a landscape
BROKEN = b"not an image at all"

pytestmark = pytest.mark.ray   # every test reads pipeline_rows, a run on the session's Ray


@pytest.fixture(scope="module")
def pipeline_rows(ray_session, tmp_path_factory):
    """The pipeline's rows for the photos (and one undecodable file), alignment on: {key: row}, codes shaped."""
    src = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(os.path.join(DATA_DIR, name), src / name)
    (src / "broken.jpg").write_bytes(BROKEN)
    out = tmp_path_factory.mktemp("out")
    cfg = pipeline_config(str(src), str(out), DEMO_CHECKPOINT, align__enabled=True)
    assert run(cfg, echo=lambda s: None).exit_code == 0
    path = next((out / "latents").iterdir())
    shape = json.loads(pq.read_schema(path).metadata[b"codes_shape"])
    df = pd.read_parquet(path)
    rows = {r.key: r for r in df.itertuples()}
    assert {k: r.status for k, r in rows.items()} == {"astronaut": "ok", "china": "no_face", "grace_hopper": "ok",
                                                     "broken": "decode_error"}
    return {k: (r.status, None if r.codes is None else np.asarray(r.codes, np.float32).reshape(shape), r.quad)
            for k, r in rows.items()}


def _assert_same_rows(got: dict, want: dict) -> None:
    assert {k: v[0] for k, v in got.items()} == {k: want[k][0] for k in got}
    for key, (status, codes, quad) in got.items():
        if status == "ok":
            np.testing.assert_array_equal(codes, want[key][1], err_msg=key)
            np.testing.assert_array_equal(np.asarray(quad, np.float32), np.asarray(want[key][2], np.float32))
        else:
            assert np.isnan(codes).all(), key


@pytest.mark.parametrize("form", ["bytes", "uint8"])
def test_ray_data_map_batches_gives_the_pipelines_rows(pipeline_rows, ray_session, form):
    """The same photographs through ds.map_batches(InvertPhotos, ...): one row per photo (policy largest), the
    batch's other columns carried along, statuses and codes equal to the pipeline's for each photo. As encoded
    bytes (and an undecodable file) or as decoded HxWx3 uint8 arrays of different sizes."""
    import ray.data

    items = []
    for name in PHOTOS:
        data = open(os.path.join(DATA_DIR, name), "rb").read()
        items.append({"name": name.rsplit(".", 1)[0], "image": data if form == "bytes" else decode_image(data)})
    if form == "bytes":
        items.append({"name": "broken", "image": BROKEN})
    ds = ray.data.from_items(items).map_batches(
        InvertPhotos, fn_constructor_kwargs={"checkpoint": DEMO_CHECKPOINT, "batch_size": 4},
        concurrency=1, num_cpus=1, batch_size=len(items))
    out = ds.take_all()
    assert sorted(r["name"] for r in out) == sorted(i["name"] for i in items)
    for r in out:
        assert r["recon"].shape == (256, 256, 3) and r["codes"].dtype == np.float32
        assert (r["error"] is None) == (r["status"] == "ok")
    got = {r["name"]: (r["status"], r["codes"], r["quad"]) for r in out}
    _assert_same_rows(got, pipeline_rows)


def test_photo_inverter_takes_uint8_photos(pipeline_rows):
    """The Python API for photos in memory: HxWx3 uint8 arrays in, the pipeline's rows and codes out (keys as
    given); an array that is not a photo is a decode_error row naming what was expected."""
    import torch

    threads = torch.get_num_threads()
    try:  # one thread, as the pipeline's one-CPU actor runs: the same float sums
        inverter = PhotoInverter(DEMO_CHECKPOINT, batch_size=4, num_threads=1)
        photos = [decode_image(open(os.path.join(DATA_DIR, n), "rb").read()) for n in PHOTOS]
        keys = [n.rsplit(".", 1)[0] for n in PHOTOS]
        out = inverter.invert(photos + [np.zeros((8, 8), np.float32)], keys + ["bad"])
    finally:
        torch.set_num_threads(threads)
    assert [r.key for r in out.rows] == keys + ["bad"] and out.photo.tolist() == [0, 1, 2, 3]
    assert out.rows[3].status == "decode_error" and "HxWx3 uint8" in out.rows[3].error
    _assert_same_rows({r.key: (r.status, out.codes[k], r.quad) for k, r in enumerate(out.rows[:3])}, pipeline_rows)
    assert np.isfinite(out.recon_psnr[[0, 2]]).all() and np.isnan(out.recon_psnr[[1, 3]]).all()


def test_photo_inverter_aligning_on_its_device(pipeline_rows):
    """With align.backend torch the photos are aligned by the actor's own device path (here on the CPU), as a
    pipeline run's actor aligns them: each row maps back to its photo, the statuses are the pipeline's and the
    faces' corners agree with dlib's to a pixel (the backends' agreement is tests/pipeline/test_align_backends.py's)."""
    inverter = PhotoInverter(DEMO_CHECKPOINT, align=AlignConfig(backend="torch"), batch_size=4, device="cpu")
    assert inverter.info()["align_backend"] == "torch"
    data = [open(os.path.join(DATA_DIR, n), "rb").read() for n in PHOTOS]
    out = inverter.invert(data[::-1] + [BROKEN], [n.rsplit(".", 1)[0] for n in PHOTOS][::-1] + ["broken"])
    assert out.photo.tolist() == [0, 1, 2, 3]
    assert {r.key: r.status for r in out.rows} == {k: v[0] for k, v in pipeline_rows.items()}
    for k, r in enumerate(out.rows):
        if r.status == "ok":
            assert np.isfinite(out.codes[k]).all()
            np.testing.assert_allclose(r.quad, pipeline_rows[r.key][2], atol=1.0)
