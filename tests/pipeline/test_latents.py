"""decode / edit / mix / interpolate over an inversion run's latents: outputs, exactly-once reruns,
refusals, and the same round trip on S3 (moto) through the CLI."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.inputs import make_tar, pipeline_config, tiny_image_bytes
from helpers.paths import DATA_DIR

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
N_LATENT = 10  # the 64px tiny checkpoint


def _cli(*args) -> int:
    import run_pipeline

    return run_pipeline.main(list(args))


def _df(fs, root) -> pd.DataFrame:
    fs.invalidate_cache()
    files = sorted(fs.glob(f"{root}/latents/*.parquet"))
    return pd.concat([pd.read_parquet(p, filesystem=fs) for p in files], ignore_index=True).set_index("key")


def _images(fs, root) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(fs.glob(f"{root}/images/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(p))) as tf:
            for m in tf.getmembers():
                out[m.name] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())), np.int16)
    return out


def _codes(df, col="codes") -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32).reshape(N_LATENT, 512) for k, v in df[col].items() if v is not None}


@pytest.fixture(scope="module")
def inverted(tmp_path_factory, tiny_checkpoint):
    """An inversion run (png, 2 shards, one undecodable input) to run the subcommands on."""
    from pipeline.runner import run

    d = tmp_path_factory.mktemp("latents_src")
    (d / "in").mkdir()
    for i in range(5):
        (d / "in" / f"p{i}.jpg").write_bytes(tiny_image_bytes(10 + i))
    (d / "in" / "p5.jpg").write_bytes(b"not an image")
    cfg = pipeline_config(str(d / "in"), str(d / "inv"), tiny_checkpoint, output__image_format="png", shard_size=3)
    assert run(cfg).exit_code == 0
    return str(d / "inv")


def test_decode_reproduces_reconstructions_and_is_exactly_once(inverted, tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    out = str(tmp_path / "dec")
    # the checkpoint comes from the input's _run.json
    assert _cli("decode", "--latents", inverted, "--output", out, "--set", "output.image_format=png",
                "--set", "progress=false") == 0
    src, dst = _df(fs, inverted), _df(fs, out)
    assert set(dst.index) == set(src.index) and dst.loc["p5", "status"] == "decode_error"
    assert dst.loc["p5", "codes"] is None
    a, b = _codes(src), _codes(dst)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    si, di = _images(fs, inverted), _images(fs, out)
    assert set(di) == {f"{k}.recon.png" for k in a}
    for name, img in di.items():
        assert np.abs(img - si[name]).max() <= 1, name   # the same codes decode to the same image
    assert os.path.exists(f"{out}/_SUCCESS")
    rec = json.loads(open(f"{out}/_run.json").read())
    assert rec["status"] == "succeeded" and rec["op"] == "decode"

    # rerun: every shard already committed, nothing rewritten
    stats = sorted(os.listdir(f"{out}/stats"))
    mtimes = {s: os.path.getmtime(f"{out}/stats/{s}") for s in stats}
    # an interrupted run's leftover (a latents file without stats) is removed
    open(f"{out}/latents/zz-orphan.parquet", "wb").write(b"partial")
    assert _cli("decode", "--latents", inverted, "--output", out, "--set", "output.image_format=png") == 0
    assert {s: os.path.getmtime(f"{out}/stats/{s}") for s in stats} == mtimes
    assert not os.path.exists(f"{out}/latents/zz-orphan.parquet")
    # a shard whose stats are gone is redone, the other is not
    os.remove(f"{out}/stats/{stats[0]}")
    assert _cli("decode", "--latents", inverted, "--output", out, "--set", "output.image_format=png") == 0
    assert os.path.getmtime(f"{out}/stats/{stats[1]}") == mtimes[stats[1]]
    assert os.path.exists(f"{out}/stats/{stats[0]}")
    # other options into the same output are refused, unless overwrite
    assert _cli("decode", "--latents", inverted, "--output", out, "--set", "output.image_format=jpg") == 2
    assert _cli("decode", "--latents", inverted, "--output", out, "--set", "output.image_format=jpg",
                "--set", "output.overwrite=true") == 0
    assert set(_images(fs, out)) == {f"{k}.recon.jpg" for k in a}


def test_edit_mix_interpolate(inverted, tmp_path, tiny_checkpoint):
    import fsspec

    fs = fsspec.filesystem("file")
    src = _df(fs, inverted)
    codes = _codes(src)
    src_img = _images(fs, inverted)
    rng = np.random.default_rng(1)
    direction = rng.normal(size=(N_LATENT, 512)).astype(np.float32)
    np.save(tmp_path / "d.npy", direction)

    out = str(tmp_path / "ed")
    assert _cli("edit", "--latents", inverted, "--output", out, "--direction", f"d1={tmp_path / 'd.npy'}",
                "--alphas=0,2", "--layers", "2:6", "--save-codes", "--set", "output.image_format=png") == 0
    df, img = _df(fs, out), _images(fs, out)
    assert set(img) == {f"{k}.edit_d1_{a}.png" for k in codes for a in (0, 2)}
    e0, e2 = _codes(df, "codes_edit_d1_0"), _codes(df, "codes_edit_d1_2")
    for k in codes:
        assert np.array_equal(e0[k], codes[k])
        np.testing.assert_allclose(e2[k][2:6] - codes[k][2:6], 2 * direction[2:6], atol=1e-5)
        assert np.array_equal(e2[k][:2], codes[k][:2]) and np.array_equal(e2[k][6:], codes[k][6:])
        assert np.abs(img[f"{k}.edit_d1_0.png"] - src_img[f"{k}.recon.png"]).max() <= 1
        assert np.abs(img[f"{k}.edit_d1_2.png"] - src_img[f"{k}.recon.png"]).mean() > 0.5
    assert df.loc["p5", "codes_edit_d1_2"] is None

    out = str(tmp_path / "mix")
    assert _cli("mix", "--latents", inverted, "--output", out, "--reference", "p3", "--layers", "0:6",
                "--set", "output.image_format=png") == 0
    mixed, img = _codes(_df(fs, out)), _images(fs, out)
    for k in codes:
        assert np.array_equal(mixed[k][:6], codes["p3"][:6]) and np.array_equal(mixed[k][6:], codes[k][6:])
    assert np.abs(img["p3.mix.png"] - src_img["p3.recon.png"]).max() <= 1   # mixed with itself
    from models import load_e2style
    from pipeline.edit import decode_codes

    model = load_e2style(tiny_checkpoint)
    want = decode_codes(model, np.stack([mixed["p0"], mixed["p4"]])).astype(np.int16)
    assert np.abs(img["p0.mix.png"] - want[0]).max() <= 1 and np.abs(img["p4.mix.png"] - want[1]).max() <= 1
    assert _cli("mix", "--latents", inverted, "--output", str(tmp_path / "mix2"), "--reference", "nope",
                "--layers", "4:10") == 2

    out = str(tmp_path / "interp")
    assert _cli("interpolate", "--latents", inverted, "--output", out, "--steps", "3", "--pair", "p0:p4",
                "--set", "output.image_format=png") == 0
    ic, img = _codes(_df(fs, out)), _images(fs, out)
    assert set(ic) == {"p0__p4__0", "p0__p4__1", "p0__p4__2"}
    assert np.array_equal(ic["p0__p4__0"], codes["p0"]) and np.array_equal(ic["p0__p4__2"], codes["p4"])
    np.testing.assert_allclose(ic["p0__p4__1"], (codes["p0"] + codes["p4"]) / 2, atol=1e-6)
    assert np.abs(img["p0__p4__2.interp.png"] - src_img["p4.recon.png"]).max() <= 1
    # default pairing: consecutive ok rows within each shard
    out = str(tmp_path / "interp2")
    assert _cli("interpolate", "--latents", inverted, "--output", out, "--steps", "2") == 0
    keys = set(_df(fs, out).index)
    assert keys == {"p0__p1__0", "p0__p1__1", "p3__p4__0", "p3__p4__1"}


def test_decode_and_edit_paste_back_into_the_originals(tmp_path, tiny_checkpoint, capsys):
    """output.paste_back in the subcommands: each face goes into its original photo, read back from the row's
    source (here a WebDataset member holding two faces, align.policy all: two rows share it) along the row's
    quad; interpolate refuses the option."""
    import fsspec

    from pipeline.paste import paste_back
    from pipeline.decode import decode_image
    from pipeline.runner import run

    astro = np.asarray(Image.open(os.path.join(DATA_DIR, "astronaut.jpg")).convert("RGB"))[:300, 60:460]
    hopper = np.asarray(Image.open(os.path.join(DATA_DIR, "grace_hopper.jpg")).convert("RGB").resize((307, 360)))
    canvas = np.full((360, 400 * 360 // 300 + 327, 3), 90, np.uint8)
    canvas[:, :480] = np.asarray(Image.fromarray(astro).resize((480, 360)))
    canvas[:, 500:] = hopper
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=95)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.tar").write_bytes(make_tar({"two": buf.getvalue()}))
    inv = str(tmp_path / "inv")
    assert run(pipeline_config(str(tmp_path / "in"), inv, tiny_checkpoint, align__enabled=True, align__policy="all",
                               output__image_format="png")).exit_code == 0
    fs = fsspec.filesystem("file")
    src = _df(fs, inv)
    assert list(src.index) == ["two", "two_face1"] and (src.source == src.source.iloc[0]).all()
    assert src.source.iloc[0].endswith("part-0.tar#two.jpg")
    orig = decode_image(buf.getvalue())
    np.save(tmp_path / "d.npy", np.full((512,), 0.5, np.float32))
    for op, extra, suffix in (("decode", [], "recon"), ("edit", ["--direction", f"d={tmp_path / 'd.npy'}", "--alphas=2"], "edit_d_2")):
        out = str(tmp_path / op)
        assert _cli(op, "--latents", inv, "--output", out, *extra, "--set", "output.image_format=png",
                    "--set", "output.paste_back=true") == 0
        img = _images(fs, out)
        assert set(img) == {f"{k}.{suffix}{p}.png" for k in ("two", "two_face1") for p in ("", ".paste")}
        for k in ("two", "two_face1"):
            quad = np.asarray(src.loc[k, "quad"], np.float64).reshape(4, 2)
            want = paste_back(orig, img[f"{k}.{suffix}.png"].astype(np.uint8), quad).astype(np.int16)
            assert img[f"{k}.{suffix}.paste.png"].shape == orig.shape
            assert np.abs(img[f"{k}.{suffix}.paste.png"] - want).max() <= 1
            assert np.abs(want - orig.astype(np.int16)).max() > 0   # the face did change the photo
        (stats_path,) = fs.glob(f"{out}/stats/*.json")
        assert json.loads(fs.cat_file(stats_path))["paste_missing"] == 0
    # Originals gone since the inversion: the faces are still written, the pasted photos are counted missing.
    (tmp_path / "in" / "part-0.tar").unlink()
    out = str(tmp_path / "gone")
    assert _cli("decode", "--latents", inv, "--output", out, "--set", "output.image_format=png",
                "--set", "output.paste_back=true") == 0
    assert set(_images(fs, out)) == {"two.recon.png", "two_face1.recon.png"}
    (stats_path,) = fs.glob(f"{out}/stats/*.json")
    assert json.loads(fs.cat_file(stats_path))["paste_missing"] == 2
    capsys.readouterr()
    assert _cli("interpolate", "--latents", inv, "--output", str(tmp_path / "ip"), "--set", "output.paste_back=true") == 2
    assert "output.paste_back" in capsys.readouterr().err


def test_subcommands_on_s3(tiny_checkpoint, s3fs_session, s3_bucket, moto_server, tmp_path):
    from pipeline.runner import run

    fs = s3fs_session
    for i in range(3):
        fs.pipe(f"{s3_bucket}/in/q{i}.jpg", tiny_image_bytes(40 + i))
    fs.put_file(tiny_checkpoint, f"{s3_bucket}/ckpt/m.pt")
    np.save(tmp_path / "d.npy", np.ones((1, 512), np.float32))
    fs.put_file(str(tmp_path / "d.npy"), f"{s3_bucket}/dirs/d.npy")
    inv = f"s3://{s3_bucket}/inv"
    cfg = pipeline_config(f"s3://{s3_bucket}/in", inv, f"s3://{s3_bucket}/ckpt/m.pt", moto_server,
                          output__image_format="png")
    assert run(cfg).exit_code == 0
    ep = ["--set", f"storage.endpoint_url={moto_server}", "--set", "output.image_format=png"]
    runs = {"decode": [], "edit": ["--direction", f"d=s3://{s3_bucket}/dirs/d.npy", "--alphas=0,1", "--save-codes"],
            "mix": ["--reference", "q1", "--layers", "0:3"], "interpolate": ["--steps", "2"]}
    src = _codes(_df(fs, f"{s3_bucket}/inv"))
    for op, extra in runs.items():
        out = f"s3://{s3_bucket}/{op}"
        assert _cli(op, "--latents", inv, "--output", out, *ep, *extra) == 0, op
        assert fs.exists(f"{s3_bucket}/{op}/_SUCCESS")
        df, img = _df(fs, f"{s3_bucket}/{op}"), _images(fs, f"{s3_bucket}/{op}")
        assert len(img) == {"decode": 3, "edit": 6, "mix": 3, "interpolate": 2}[op]
        if op == "edit":
            e1 = _codes(df, "codes_edit_d_1")
            assert all(np.allclose(e1[k] - src[k], 1.0, atol=1e-5) for k in src)
        # rerun on S3: nothing to do, still succeeds
        assert _cli(op, "--latents", inv, "--output", out, *ep, *extra) == 0
