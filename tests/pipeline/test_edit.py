"""The editing stage: direction files (the real E2Style ones and bad ones), edits applied in the pipeline
on an 18-latent model, alpha 0 reproducing the inversion, and refusal of a bad file before any output."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.inputs import pipeline_config, tiny_image_bytes
from helpers.paths import DATA_DIR
from pipeline.config import ConfigError
from pipeline.edit import DirectionError, apply_direction, load_direction, load_directions, variant_tag

DIRS = os.path.join(DATA_DIR, "editing_directions")  # copies of the team's shared editing_directions data, kept in the repo


@pytest.fixture(scope="module")
def ckpt18(tmp_path_factory):
    """An 18-latent model (1024px generator at width 16, style_dim 512: the official W+ shape), 1 stage."""
    from models.factory import write_checkpoint

    return write_checkpoint(str(tmp_path_factory.mktemp("c18") / "r1024_w16.pt"), resolution=1024, stages=1, width=16)


def _bad_files(d) -> dict[str, str]:
    """name -> path of a direction file that must be refused."""
    out = {}
    np.save(d / "shape.npy", np.zeros((17, 512)))
    out["shape"] = str(d / "shape.npy")
    a = np.zeros((18, 512))
    a[3, 7] = np.nan
    np.save(d / "nan.npy", a)
    out["nan"] = str(d / "nan.npy")
    np.save(d / "pickled.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    out["pickled"] = str(d / "pickled.npy")
    (d / "text.npy").write_text("0.1 0.2 0.3\n")
    out["not_npy"] = str(d / "text.npy")
    np.save(d / "ints.npy", np.ones((18, 512), np.int64))
    out["int"] = str(d / "ints.npy")
    return out


def test_real_directions_load_for_18_latents():
    dirs = load_directions({"age": f"{DIRS}/age.npy", "smile": f"{DIRS}/smile.npy"}, 18, 512)
    for name in ("age", "smile"):
        raw = np.load(f"{DIRS}/{name}.npy", allow_pickle=False)
        assert raw.dtype == np.float64 and raw.shape == (18, 512)
        assert dirs[name].dtype == np.float32 and dirs[name].shape == (18, 512)
        np.testing.assert_allclose(dirs[name], raw, rtol=1e-6, atol=1e-7)
    assert not np.allclose(dirs["age"], dirs["smile"])
    # the same files do not fit a model of another n_latent or width
    with pytest.raises(DirectionError, match=r"age\.npy.*shape \(18, 512\)"):
        load_direction(f"{DIRS}/age.npy", 14, 512)
    with pytest.raises(DirectionError, match="style_dim=32"):
        load_direction(f"{DIRS}/age.npy", 18, 32)


def test_direction_shapes_broadcast(tmp_path):
    v = np.linspace(-1, 1, 32)
    np.save(tmp_path / "a.npy", v)
    np.save(tmp_path / "b.npy", v[None].astype(np.float32))
    for p in ("a.npy", "b.npy"):
        d = load_direction(str(tmp_path / p), 6, 32)
        assert d.shape == (6, 32) and np.allclose(d, v[None])


@pytest.mark.parametrize("kind", ["shape", "nan", "pickled", "not_npy", "int"])
def test_bad_direction_files_refused(tmp_path, kind, monkeypatch):
    path = _bad_files(tmp_path)[kind]
    # a pickled object array must be refused without being unpickled
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("unpickled a direction file"))
    with pytest.raises(DirectionError) as ei:
        load_direction(path, 18, 512)
    msg = str(ei.value)
    assert os.path.basename(path) in msg
    assert {"shape": "shape (17, 512)", "nan": "non-finite", "pickled": "pickled object array",
            "not_npy": "not a .npy", "int": "not floating point"}[kind] in msg


def test_direction_from_s3(s3fs_session, s3_bucket, moto_server):
    s3fs_session.put_file(f"{DIRS}/smile.npy", f"{s3_bucket}/dirs/smile.npy")
    d = load_direction(f"s3://{s3_bucket}/dirs/smile.npy", 18, 512, endpoint_url=moto_server)
    np.testing.assert_allclose(d, np.load(f"{DIRS}/smile.npy"), rtol=1e-6, atol=1e-7)
    with pytest.raises(DirectionError, match="not found"):
        load_direction(f"s3://{s3_bucket}/dirs/missing.npy", 18, 512, endpoint_url=moto_server)


def test_apply_direction_alpha_zero_and_layers():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(3, 18, 512)).astype(np.float32)
    d = np.load(f"{DIRS}/age.npy").astype(np.float32)
    assert np.array_equal(apply_direction(codes, d, 0.0), codes)
    e = apply_direction(codes, d, 2.0, layers=[4, 8])
    assert np.array_equal(e[:, :4], codes[:, :4]) and np.array_equal(e[:, 8:], codes[:, 8:])
    np.testing.assert_allclose(e[:, 4:8] - codes[:, 4:8], 2.0 * np.broadcast_to(d[4:8], (3, 4, 512)), atol=1e-5)
    assert variant_tag("age", -3) == "edit_age_-3" and variant_tag("smile", 1.5) == "edit_smile_1.5"


def _members(path) -> dict[str, np.ndarray]:
    with tarfile.open(path) as tf:
        return {m.name: np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())), np.int16) for m in tf.getmembers()}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_pipeline_edit_stage_18_latents(tmp_path, ckpt18):
    from pipeline.runner import run

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        (inp / f"img{i}.jpg").write_bytes(tiny_image_bytes(i))
    cfg = pipeline_config(str(inp), str(tmp_path / "out"), ckpt18, output__image_format="png",
                          edit__directions={"age": f"{DIRS}/age.npy", "smile": f"{DIRS}/smile.npy"},
                          edit__alphas=[0, 3], edit__save_codes=True)
    assert run(cfg).exit_code == 0
    df = pd.read_parquet(tmp_path / "out" / "latents").sort_values("key").reset_index(drop=True)
    assert list(df.key) == ["img0", "img1", "img2"] and (df.status == "ok").all()
    codes = np.stack(df.codes.to_numpy()).reshape(3, 18, 512)
    for name in ("age", "smile"):
        d = np.load(f"{DIRS}/{name}.npy")
        c0 = np.stack(df[f"codes_edit_{name}_0"].to_numpy()).reshape(3, 18, 512)
        c3 = np.stack(df[f"codes_edit_{name}_3"].to_numpy()).reshape(3, 18, 512)
        assert np.array_equal(c0, codes)                     # alpha 0 is the inversion itself
        np.testing.assert_allclose(c3 - codes, 3 * np.broadcast_to(d, (3, 18, 512)), atol=1e-4)
    imgs = _members(next((tmp_path / "out" / "images").glob("*.tar")))
    assert set(imgs) == {f"img{i}.{t}.png" for i in range(3)
                         for t in ("recon", "edit_age_0", "edit_age_3", "edit_smile_0", "edit_smile_3")}
    for i in range(3):
        recon = imgs[f"img{i}.recon.png"]
        assert np.abs(imgs[f"img{i}.edit_age_0.png"] - recon).max() <= 1   # alpha 0 reproduces the recon
        assert np.abs(imgs[f"img{i}.edit_age_3.png"] - recon).mean() > 0.5  # an edit changes the image
        assert np.abs(imgs[f"img{i}.edit_smile_3.png"] - imgs[f"img{i}.edit_age_3.png"]).mean() > 0.1


@pytest.mark.parametrize("kind", ["shape", "nan", "pickled", "not_npy"])
def test_bad_direction_stops_the_job_before_any_output(tmp_path, ckpt18, kind, capsys):
    import run_pipeline

    bad = _bad_files(tmp_path)[kind]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(tiny_image_bytes(0))
    out = tmp_path / "out"
    rc = run_pipeline.main(["--set", f"input.url={inp}", "--set", f"output.url={out}", "--set", f"model.checkpoint={ckpt18}",
                            "--set", "align.enabled=false", "--set", "progress=false",
                            "--set", f"edit.directions={{age: {DIRS}/age.npy, bad: {bad}}}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "edit.directions" in err and os.path.basename(bad) in err
    assert not out.exists()  # nothing written, not even _run.json


def test_replaced_direction_file_is_another_run(tmp_path, ckpt18):
    """The run fingerprint covers a direction file's contents, not only its path: a rerun after the file was
    replaced in place is refused like any changed config (plan() is the driver's check, before any output)."""
    from pipeline.runner import plan

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(tiny_image_bytes(1))
    d = tmp_path / "dirs"
    d.mkdir()
    np.save(d / "smile.npy", np.load(f"{DIRS}/smile.npy"))
    cfg = pipeline_config(str(src), str(tmp_path / "out"), ckpt18, edit__directions={"smile": str(d / "smile.npy")},
                          edit__alphas=[1.0])
    first, again = plan(cfg), plan(cfg)
    assert first.fingerprint == again.fingerprint
    np.save(d / "smile.npy", np.load(f"{DIRS}/age.npy"))  # same path, other contents
    replaced = plan(cfg)
    assert replaced.fingerprint != first.fingerprint
    key = "edit.directions_sha256"
    assert replaced.fingerprint_values[key]["smile"] != first.fingerprint_values[key]["smile"]


def test_edit_config_validation(tmp_path):
    base = dict(input_url=str(tmp_path / "i"), output_url=str(tmp_path / "o"), checkpoint="x.pt")
    for sets, key in [({"edit__alphas": []}, "edit.alphas"), ({"edit__alphas": [1, "a"]}, "edit.alphas"),
                      ({"edit__layers": [5, 2]}, "edit.layers"), ({"edit__directions": ["a.npy"]}, "edit.directions"),
                      ({"edit__directions": {"a b": "x.npy"}}, "edit.directions"),
                      ({"edit__directions": {"a": "x.npy"}, "output__image_size": 0}, "edit.save_codes")]:
        with pytest.raises(ConfigError) as ei:
            pipeline_config(base["input_url"], base["output_url"], base["checkpoint"], **sets)
        assert ei.value.key == key, sets


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_paste_back_with_edit(tmp_path, tiny_checkpoint):
    """output.paste_back on a real photo: the reconstruction and each edit pasted into the original along the
    alignment quad; pixels away from the face are the original's, the face region is not."""
    import shutil

    from pipeline.paste import paste_back
    from pipeline.decode import decode_image
    from pipeline.runner import run

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(os.path.join(DATA_DIR, "astronaut.jpg"), src / "astronaut.jpg")
    np.save(tmp_path / "d.npy", np.full((512,), 0.5, np.float32))
    cfg = pipeline_config(str(src), str(tmp_path / "out"), tiny_checkpoint, align__enabled=True,
                          output__paste_back=True, output__image_format="png",
                          edit__directions={"d": str(tmp_path / "d.npy")}, edit__alphas=[2])
    assert run(cfg, echo=lambda s: None).exit_code == 0
    imgs = _members(next((tmp_path / "out" / "images").glob("*.tar")))
    assert set(imgs) == {"astronaut.recon.png", "astronaut.edit_d_2.png", "astronaut.paste.png",
                         "astronaut.edit_d_2.paste.png"}
    orig = decode_image((src / "astronaut.jpg").read_bytes()).astype(np.int16)
    df = pd.read_parquet(tmp_path / "out" / "latents")
    quad = np.asarray(df.quad[0], np.float64).reshape(4, 2)
    for name, face in (("astronaut.paste.png", "astronaut.recon.png"), ("astronaut.edit_d_2.paste.png", "astronaut.edit_d_2.png")):
        pasted = imgs[name]
        assert pasted.shape == orig.shape
        want = paste_back(orig.astype(np.uint8), imgs[face].astype(np.uint8), quad).astype(np.int16)
        assert np.abs(pasted - want).max() <= 1
        x0, y0 = np.floor(quad.min(0)).astype(int)
        x1, y1 = np.ceil(quad.max(0)).astype(int)
        outside = np.ones(orig.shape[:2], bool)
        outside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
        assert np.array_equal(pasted[outside], orig[outside])
        cx, cy = quad.mean(0).astype(int)
        assert np.abs(pasted[cy - 20:cy + 20, cx - 20:cx + 20] - orig[cy - 20:cy + 20, cx - 20:cx + 20]).mean() > 5
    assert np.abs(imgs["astronaut.paste.png"] - imgs["astronaut.edit_d_2.paste.png"]).max() > 0
