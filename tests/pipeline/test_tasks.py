"""E2Style tasks: the encoder input of each task, the checkpoint's input_nc/label_nc checked against the
task (before any output), and tasks end to end through the pipeline on small models."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers.inputs import pipeline_config, tiny_image_bytes
from pipeline.config import ConfigError
from pipeline.tasks import NOISE_SIGMA, check_model, make_input


def _faces(n=2, size=256, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _x(faces):
    return torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def test_task_inputs():
    f = _faces()
    x = _x(f)
    inp, tgt = make_input(x, {"name": "colorize"}, 3, f)
    assert inp.shape == (2, 3, 256, 256) and torch.equal(inp[:, 0], inp[:, 1]) and torch.equal(inp[:, 1], inp[:, 2])
    assert torch.allclose(inp[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)
    assert torch.equal(tgt, x)
    assert make_input(x, {"name": "colorize"}, 1, f)[0].shape == (2, 1, 256, 256)

    n1, _ = make_input(x, {"name": "denoise"}, 3, f)
    n2, _ = make_input(x[[1, 0]], {"name": "denoise"}, 3, f[[1, 0]])
    assert torch.equal(n1[0], n2[1])                      # the noise follows the face, not the batch
    resid = (n1 - x)[(x.abs() < 0.5)]                      # away from clipping
    assert abs(resid.std().item() - 2 * NOISE_SIGMA) < 0.01

    m, _ = make_input(x, {"name": "inpaint"}, 3, f)
    assert (m[:, :, 64:192, 64:192] == -1).all() and torch.equal(m[:, :, :64], x[:, :, :64])

    s4, _ = make_input(x, {"name": "super_resolution", "resize_factor": 4}, 3, f)
    s8, _ = make_input(x, {"name": "super_resolution", "resize_factor": 8}, 3, f)
    assert s4.shape == x.shape and (s4 - x).abs().mean() < (s8 - x).abs().mean()
    flat = np.full((1, 256, 256, 3), 77, np.uint8)   # nothing to lose: a constant face passes unchanged
    s, _ = make_input(_x(flat), {"name": "super_resolution", "resize_factor": 4}, 3, flat)
    assert (s - _x(flat)).abs().max() < 1e-5

    sk, t = make_input(x, {"name": "sketch"}, 1, f)
    assert sk.shape == (2, 1, 256, 256) and t is None and sk.min() >= 0 and sk.max() <= 1

    labels = np.random.default_rng(3).integers(0, 21, (2, 128, 128), dtype=np.uint8)   # 19, 20: out of range
    lf = np.repeat(labels[..., None], 3, axis=3)
    oh, t = make_input(_x(lf), {"name": "segmentation", "label_nc": 19}, 19, lf)
    assert oh.shape == (2, 19, 256, 256) and t is None
    up = labels.repeat(2, axis=1).repeat(2, axis=2)          # nearest-neighbour upsampling
    assert torch.equal(oh.argmax(1)[torch.from_numpy(up < 19)], torch.from_numpy(up.astype(np.int64))[torch.from_numpy(up < 19)])
    assert (oh.sum(1) == torch.from_numpy((up < 19).astype(np.float32))).all()


def test_check_model():
    check_model("invert", 3)
    check_model("sketch", 1)
    check_model("segmentation", 19, 19)
    for task, nc, lnc, msg in [("sketch", 3, 0, "input_nc 1"), ("segmentation", 3, 0, "label_nc"),
                               ("denoise", 1, 0, "input_nc 3"), ("invert", 19, 19, "segmentation")]:
        with pytest.raises(ValueError, match=msg):
            check_model(task, nc, lnc)


def test_task_config_validation(tmp_path):
    with pytest.raises(ConfigError) as ei:
        pipeline_config(str(tmp_path / "i"), str(tmp_path / "o"), "x.pt", task="deblur")
    assert ei.value.key == "task"
    with pytest.raises(ConfigError) as ei:
        pipeline_config(str(tmp_path / "i"), str(tmp_path / "o"), "x.pt", task="segmentation", align__enabled=True)
    assert ei.value.key == "align.enabled"
    with pytest.raises(ConfigError) as ei:
        pipeline_config(str(tmp_path / "i"), str(tmp_path / "o"), "x.pt", output__paste_back=True)
    assert ei.value.key == "output.paste_back"


def test_task_against_checkpoint_refused_before_output(tmp_path, tiny_checkpoint):
    from pipeline.runner import run

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(tiny_image_bytes(0))
    cfg = pipeline_config(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint, task="sketch")
    with pytest.raises(ConfigError, match="input_nc 1") as ei:
        run(cfg)
    assert ei.value.key == "task" and not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("task,input_nc,label_nc", [("super_resolution", 3, 0), ("sketch", 1, 0), ("segmentation", 19, 19)])
def test_task_pipeline(tmp_path, task, input_nc, label_nc):
    from models.factory import write_checkpoint
    from pipeline.runner import run

    ck = write_checkpoint(str(tmp_path / "m.pt"), resolution=32, stages=1, width=32, input_nc=input_nc,
                          opts={"label_nc": label_nc})
    (tmp_path / "in").mkdir()
    for i in range(2):
        if task == "segmentation":
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 19, (64, 64), dtype=np.uint8), "L").save(buf, "PNG")
            data = buf.getvalue()
        else:
            data = tiny_image_bytes(i)
        (tmp_path / "in" / f"t{i}.png").write_bytes(data)
    cfg = pipeline_config(str(tmp_path / "in"), str(tmp_path / "out"), ck, task=task, resize_factor=8)
    assert run(cfg).exit_code == 0
    df = pd.read_parquet(tmp_path / "out" / "latents")
    assert (df.status == "ok").all() and len(df) == 2
    assert df.recon_psnr.notna().all() if task == "super_resolution" else df.recon_psnr.isna().all()
    rec = (tmp_path / "out" / "_run.json").read_text()
    assert f'"task": "{task}"' in rec
