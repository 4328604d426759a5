"""Pipeline pieces without Ray: shard planning and its stability, key sanitising, the tar writer, the
inversion functions and actor class on a small model, and a real-photo run with alignment on."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import fsspec
import numpy as np
import pandas as pd
import pytest

from helpers.inputs import make_parquet, make_tar, pipeline_config, tiny_image_bytes
from helpers.paths import DATA_DIR, REPO_ROOT
from pipeline.cluster import aligning_actor_cpus, cpus_per_gpu
from pipeline.read import plan_shards, sanitize_key
from pipeline.write import build_tar


def _touch(d, rel, data=b"x"):
    p = os.path.join(d, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def test_image_shard_identities_stable_when_files_are_added(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    for i in range(5):
        _touch(root, f"b/{i}.jpg")
    fmt, shards = plan_shards(fs, root, "auto", 2)
    assert fmt == "images" and [s.name for s in shards] == ["images-000000", "images-000001", "images-000002"]
    # shards 0 and 2 committed; 1 was not (crashed). Files are then added *before* and *among* old ones.
    committed = {s.name: {"format": "images", "inputs": [os.path.relpath(p, root) for p in s.paths]}
                 for s in shards if s.name != "images-000001"}
    for rel in ("a/new.jpg", "b/2a.jpg", "c/z.png"):
        _touch(root, rel)
    _touch(root, "b/readme.txt")
    _touch(root, ".hidden/x.jpg")
    _, again = plan_shards(fs, root, "auto", 2, committed)
    by = {s.name: s for s in again}
    for name, st in committed.items():  # committed shards keep exactly their files
        assert by[name].committed and sorted(os.path.relpath(p, root) for p in by[name].paths) == sorted(st["inputs"])
    todo = [s for s in again if not s.committed]
    assert todo[0].name == "images-000001"  # lowest free number reused
    todo_files = sorted(os.path.relpath(p, root) for s in todo for p in s.paths)
    assert todo_files == sorted(["a/new.jpg", "b/2.jpg", "b/2a.jpg", "b/3.jpg", "c/z.png"])
    all_files = [p for s in again for p in s.paths]
    assert len(all_files) == len(set(all_files)) == 8


def test_tar_and_parquet_one_shard_each(tmp_path):
    fs = fsspec.filesystem("file")
    for rel in ("00000.tar", "x/00001.tar", "00000_stats.json"):
        _touch(str(tmp_path), rel)
    fmt, shards = plan_shards(fs, str(tmp_path), "auto", 1000)
    assert fmt == "webdataset" and [s.name for s in shards] == ["00000", "x__00001"]
    _touch(str(tmp_path), "y.parquet")
    with pytest.raises(ValueError, match="both"):
        plan_shards(fs, str(tmp_path), "auto", 1000)


@pytest.mark.parametrize("raw, safe", [
    ("000123", "000123"), ("../../etc/passwd", "etc/passwd"), ("/abs/path", "abs/path"),
    ("a/./b/../c", "a/b/c"), ("name.with.dots", "name_with_dots"), ("..", "_"), ("we ird\x00", "we_ird_"),
    ("dir\\win", "dir/win"),
])
def test_sanitize_key(raw, safe):
    assert sanitize_key(raw) == safe


def test_build_tar_refuses_escaping_names():
    with pytest.raises(ValueError):
        build_tar([("../x.jpg", b"1")])
    with pytest.raises(ValueError):
        build_tar([("/x.jpg", b"1")])
    data = build_tar([("a/b.recon.jpg", b"12")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["a/b.recon.jpg"]


def test_inverter_without_ray(tiny_checkpoint):
    from pipeline.records import PreparedChunk, Row
    from pipeline.inverter import Inverter

    w = Inverter(tiny_checkpoint, batch_size=3)
    info = w.info()
    assert info["n_latent"] == 10 and info["stages"] == 2 and info["batch_size"] == 3
    assert list(info["init_seconds"]) == ["load"] and info["init_seconds"]["load"] >= 0  # not compiled, no aligner
    assert info["cuda_graph"] is False  # CUDA graphs only for compiled GPU actors
    assert Inverter(tiny_checkpoint).info()["batch_size"] == 16  # "auto" on a CPU actor
    rng = np.random.default_rng(0)
    faces_a = rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    faces_b = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)  # resized to 256 for the model
    a = PreparedChunk("s1", 0, [Row(f"a{i}", "x") for i in range(4)], faces_a, {}, 4)
    b = PreparedChunk("s2", 0, [Row("b0", "y"), Row("bad", "y", status="decode_error")], faces_b, {}, 2)
    empty = PreparedChunk("s3", 0, [Row("c", "z", status="no_face")], np.zeros((0, 256, 256, 3), np.uint8), {}, 1)
    ra, rb, rc = w.invert_chunks(a, b, empty)
    assert rc is None
    assert ra.codes.shape == (4, 10, 512) and ra.codes.dtype == np.float32
    assert ra.recon.shape == (4, 256, 256, 3) and ra.recon.dtype == np.uint8
    assert rb.codes.shape == (1, 10, 512) and np.isfinite(rb.psnr).all()
    # batching across chunks does not change the result of an image
    alone = w.invert_chunks(PreparedChunk("s2", 0, b.rows, faces_b, {}, 2))[0]
    np.testing.assert_allclose(alone.codes, rb.codes, atol=1e-2)  # float noise of batched convolutions
    with pytest.raises(ValueError, match="model.stages"):
        Inverter(tiny_checkpoint, stages=3)


@pytest.mark.ray
@pytest.mark.slow
def test_real_photos_with_alignment(ray_session, tiny_checkpoint, tmp_path):
    """Real faces through dlib alignment: ok rows carry quad/landmarks/score; a photo without a face is a
    no_face row; aligned crops are saved beside the reconstructions."""
    from pipeline.runner import run

    src = tmp_path / "in"
    src.mkdir()
    for name in ("astronaut.jpg", "grace_hopper.jpg", "china.jpg"):
        shutil.copy(os.path.join(DATA_DIR, name), src / name)
    (src / "tiny_noise.png").write_bytes(tiny_image_bytes(5, "PNG", size=64))
    cfg = pipeline_config(str(src), str(tmp_path / "out"), tiny_checkpoint, align__enabled=True,
                          output__save_aligned=True, output__image_format="png", output__image_size=128)
    res = run(cfg, echo=lambda s: None)
    assert res.exit_code == 0
    df = pd.read_parquet(tmp_path / "out" / "latents")
    st = dict(zip(df.key, df.status))
    assert st == {"astronaut": "ok", "grace_hopper": "ok", "china": "no_face", "tiny_noise": "no_face"}
    ok = df[df.status == "ok"]
    assert all(len(q) == 8 for q in ok.quad) and all(len(lm) == 136 for lm in ok.landmarks)
    assert (ok.score > 0).all() and ok.recon_psnr.notna().all()
    assert df[df.status != "ok"].quad.isna().all()
    with tarfile.open(tmp_path / "out" / "images" / "images-000000.tar") as tf:
        names = set(tf.getnames())
        from PIL import Image
        im = Image.open(tf.extractfile("astronaut.aligned.png"))
        assert im.size == (128, 128)
    assert names == {"astronaut.recon.png", "astronaut.aligned.png", "grace_hopper.recon.png",
                     "grace_hopper.aligned.png"}
    stats = res.summary["stage_seconds"]
    assert stats["align"] > 0 and stats["invert"] > 0


def test_read_sources_finds_the_inputs_behind_row_sources(tmp_path):
    """read_sources returns, for each row source the reader wrote (file, tar member, Parquet row, also the
    Hugging Face struct layout), the input's bytes; a missing file or member is that source's exception."""
    from pipeline.read import plan_shards, read_shard, read_sources
    from pipeline.storage import get_fs

    blobs = {f"k{i}": tiny_image_bytes(30 + i) for i in range(3)}
    for sub, name, data in (("img", "k0.jpg", blobs["k0"]), ("wds", "a.tar", make_tar(blobs)),
                            ("pq", "a.parquet", make_parquet(blobs)), ("hf", "b.parquet", make_parquet(blobs, "hf"))):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_bytes(data)
    sources, expected = [], []
    for sub in ("img", "wds", "pq", "hf"):
        fs, root = get_fs(str(tmp_path / sub))
        fmt, shards = plan_shards(fs, root, "auto", 100, {})
        for sh in shards:
            for item in read_shard(fs, sh):
                sources.append(item.source)
                expected.append(item.data)
    assert len(sources) == 10 and len({s.split("#")[0] for s in sources}) == 4
    got = read_sources(sources + [str(tmp_path / "img" / "gone.jpg"), f"{sources[1].split('#')[0]}#nope.jpg"])
    assert [got[s] for s in sources] == expected
    assert isinstance(got[str(tmp_path / "img" / "gone.jpg")], FileNotFoundError)
    assert isinstance(got[f"{sources[1].split('#')[0]}#nope.jpg"], FileNotFoundError)


def test_align_settings_reach_the_aligner():
    """align.min_face_size / detect_max_side / max_upsample go from the config to the detector."""
    from pipeline.align import get_aligner
    from pipeline.prepare import prepare_item
    from pipeline.read import InputItem

    with open(os.path.join(DATA_DIR, "grace_hopper.jpg"), "rb") as f:
        item = InputItem("gh", "/in/gh.jpg", f.read())

    def statuses(**sets):
        cfg = pipeline_config("/in", "/out", "/ck.pt", align__enabled=True, **sets)
        return [(r.status, r.score) for r, _ in prepare_item(item, cfg.prepare, {})]

    (status, score), = statuses()
    assert status == "ok"
    # Her face box is about 216 px: a larger minimum leaves no face.
    assert statuses(align__min_face_size=200)[0][0] == "ok"
    assert statuses(align__min_face_size=260) == [("no_face", None)]
    # Full-resolution detection reports the same face (with the same score, see tests/pipeline/test_align.py).
    (status2, score2), = statuses(align__detect_max_side=None, align__max_upsample=0)
    assert status2 == "ok" and abs(score2 - score) < 1e-9
    assert get_aligner(detect_max_side=None, max_upsample=0).detect_max_side is None


def test_latents_only_mode_and_padded_batches(tiny_checkpoint):
    """output.image_size 0: the last generator pass is skipped and no reconstruction is measured; padding a
    short batch to the compiled shape changes no result."""
    from models import load_e2style
    from pipeline.invert import invert_faces
    from pipeline.records import PreparedChunk, Row
    from pipeline.inverter import Inverter

    faces = np.random.default_rng(1).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    chunk = PreparedChunk("s1", 0, [Row(f"k{i}", "x") for i in range(5)], faces, {}, 5)
    full = Inverter(tiny_checkpoint, batch_size=3).invert_chunks(chunk)[0]
    latents = Inverter(tiny_checkpoint, batch_size=3, return_images=False).invert_chunks(chunk)[0]
    np.testing.assert_allclose(latents.codes, full.codes, atol=1e-5)
    assert latents.recon.shape[0] == 0 and np.isnan(latents.mse).all() and np.isnan(latents.psnr).all()

    model = load_e2style(tiny_checkpoint)
    padded = invert_faces(model, faces, batch_size=4, pad_batches=True)
    plain = invert_faces(model, faces, batch_size=4)
    assert padded.codes.shape == plain.codes.shape == (5, 10, 512)
    np.testing.assert_allclose(padded.codes, plain.codes, atol=1e-5)
    np.testing.assert_array_equal(padded.recon.shape, plain.recon.shape)


@pytest.mark.ray
def test_latents_only_run_writes_codes_without_images(ray_session, tiny_checkpoint, tmp_path):
    from pipeline.runner import run

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"im{i}.png").write_bytes(tiny_image_bytes(i, "PNG", size=32))
    cfg = pipeline_config(str(src), str(tmp_path / "out"), tiny_checkpoint, output__image_size=0)
    assert run(cfg, echo=lambda s: None).exit_code == 0
    df = pd.read_parquet(tmp_path / "out" / "latents")
    assert sorted(df.key) == ["im0", "im1", "im2"] and (df.status == "ok").all()
    assert df.codes.notna().all() and df.recon_psnr.isna().all()
    with tarfile.open(tmp_path / "out" / "images" / "images-000000.tar") as tf:
        assert tf.getnames() == []


def test_paste_back_reads_originals_under_the_input_pixel_limit():
    """One paste-back for the pipeline and the latents jobs: the original is decoded with input.max_pixels (a
    photo over it gives no pasted image, never a decompression bomb), kept while the faces of one source come
    in a row, and the pasted photo keeps the original's size."""
    from PIL import Image

    from pipeline.paste import PasteBack

    data = tiny_image_bytes(7, "PNG", size=64)
    assert PasteBack("png", 95, max_pixels=64 * 64 - 1).original("a.png", data) is None
    assert PasteBack("png", 95, max_pixels=None).original("a.png", OSError("gone")) is None
    pb = PasteBack("png", 95, max_pixels=64 * 64)
    src = pb.original("a.png", data)
    assert src.shape == (64, 64, 3)
    assert pb.original("a.png", b"not read again") is src  # same source: the decoded photo is reused
    face = np.zeros((32, 32, 3), np.uint8)
    name, png = pb.member("a.edit_x_1", src, face, [8, 8, 8, 40, 40, 40, 40, 8])
    assert name == "a.edit_x_1.paste.png"
    pasted = np.asarray(Image.open(io.BytesIO(png)))
    assert pasted.shape == (64, 64, 3) and pasted[24, 24].max() == 0 and np.array_equal(pasted[60, 60], src[60, 60])


@pytest.mark.parametrize("cpus_per_gpu, want", [(16, 4), (8, 4), (6, 3), (2, 1), (1, 1), (0, 1)])
def test_aligning_gpu_actors_get_cpus_only_where_tasks_keep_most(cpus_per_gpu, want):
    """A GPU actor that aligns takes up to ALIGNING_ACTOR_CPUS for its host copies, at most half of the CPUs
    per GPU of the smallest GPU node (reading and decoding keep the rest, and the actor fits everywhere), and
    at least one."""
    assert aligning_actor_cpus(cpus_per_gpu) == want


@pytest.mark.ray
def test_cpus_per_gpu_is_zero_without_gpus(ray_session):
    """On a cluster without GPUs (CI's), no node offers CPUs per GPU: the aligning actors' rule never applies."""
    assert cpus_per_gpu() == 0


_PREPARE_IN_CHILD = """
import json, os, sys
from pipeline.config import AlignConfig, InputConfig, PrepareConfig
from pipeline.read import plan_shards
from pipeline.storage import get_fs
from pipeline.prepare import prepare_shard
root, backend, niceness = sys.argv[1], sys.argv[2], int(sys.argv[3])
fs, path = get_fs(root)
_, shards = plan_shards(fs, path, "auto", 10)
cfg = PrepareConfig(InputConfig(url=root), AlignConfig(backend=backend), None, 64, "invert", False, niceness)
out = list(prepare_shard(shards[0], cfg))
print(json.dumps({"niceness": os.nice(0), "rows": sum(len(c.rows) for c in out[1::2])}))
"""


@pytest.mark.parametrize("backend,niceness,want", [("torch", 7, 7), ("dlib", 7, 0), ("torch", 0, 0)])
def test_decode_tasks_yield_to_actors_that_align(tmp_path, backend, niceness, want):
    """ray.cpu_task_niceness: the prepare task lowers its process's priority when the actors align (backend
    torch: it only reads and decodes), not when it aligns itself; in a child process (the niceness stays)."""
    for i in range(3):
        _touch(tmp_path, f"p{i}.png", tiny_image_bytes(i, "PNG"))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", _PREPARE_IN_CHILD, str(tmp_path), backend, str(niceness)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # lower_priority raises the niceness to the value asked (never lowers it), so under a runner that is
    # already nice the child ends at the larger of the two.
    assert got == {"niceness": max(os.nice(0), want), "rows": 3}


def test_local_runs_need_no_s3_packages():
    """botocore and s3fs are needed for s3:// URLs only: the pipeline's modules import and a local storage call
    works without them (the GPU machines used for benchmarks have neither)."""
    code = ("import sys; sys.modules['botocore'] = None; sys.modules['s3fs'] = None\n"
            "import pipeline.inverter, pipeline.storage as s, benchmarks.bench_pipeline_raw_gpu\n"
            "with s.storage_errors('input.url', '.'):\n"
            "    fs, path = s.get_fs('.')\n"
            "assert fs.exists(path)\n"
            "try:\n"
            "    with s.storage_errors('input.url', '.'):\n"
            "        raise KeyError('passes through')\n"
            "except KeyError:\n"
            "    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
