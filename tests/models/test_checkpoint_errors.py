"""A wrong model.checkpoint is named as what it is, through the command line: exit 2, the file named, nothing
written, nothing unpickled, and no advice to turn the safety off."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import run_pipeline
from helpers.inputs import tiny_image_bytes
from helpers.paths import REPO_ROOT
from models.checkpoint_kinds import SAFETENSORS, sniff_checkpoint

DEMO_GENERATOR = os.path.join(REPO_ROOT, "demo", "generator.pt")


class _RunsCode:
    """Unpickling this would create ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _folder_with_checkpoint(tmp_path, tiny_checkpoint):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_checkpoint, d / "e2style.pt")
    return d


def _truncated_torch(tmp_path, tiny_checkpoint):
    data = open(tiny_checkpoint, "rb").read()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "half.pt"


def _truncated_safetensors(tmp_path, tiny_checkpoint):
    from models.checkpoint import read_checkpoint, save_safetensors

    save_safetensors(read_checkpoint(tiny_checkpoint), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[:200])
    return tmp_path / "half.safetensors"


def _zip_not_torch(tmp_path, _):
    with zipfile.ZipFile(tmp_path / "weights.pt", "w") as z:
        z.writestr("readme.txt", "model weights: see the website")
    return tmp_path / "weights.pt"


def _npz(tmp_path, _):
    np.savez(tmp_path / "w.npz", a=np.zeros(3))
    shutil.move(tmp_path / "w.npz", tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _other_model(tmp_path, _):
    torch.save({"state_dict": {"encoder.body.0.weight": torch.zeros(2), "decoder.conv1.weight": torch.zeros(2)},
                "opts": {}}, tmp_path / "psp.pt")
    return tmp_path / "psp.pt"


def _bare_state_dict(tmp_path, _):
    torch.save({"conv.weight": torch.zeros(2), "conv.bias": torch.zeros(1)}, tmp_path / "sd.pt")
    return tmp_path / "sd.pt"


def _write(name: str, data: bytes):
    def make(tmp_path, _):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _npy(tmp_path, _):
    np.save(tmp_path / "codes.npy", np.zeros((4, 32), np.float32))
    return tmp_path / "codes.npy"


CASES = {  # name: (make the file, words the error must hold)
    "missing": (lambda tmp_path, _: tmp_path / "nope.pt", "no such checkpoint file"),
    "folder": (_folder_with_checkpoint, "is a folder, not a checkpoint file; name one of the checkpoint files in it: e2style.pt"),
    "empty": (_write("empty.pt", b""), "is empty (0 bytes)"),
    "truncated torch": (_truncated_torch, "truncated or damaged zip"),
    "truncated safetensors": (_truncated_safetensors, "truncated safetensors file"),
    "jpeg": (_write("photo.pt", tiny_image_bytes(0, "JPEG")), "is a JPEG image, not a checkpoint"),
    "png": (_write("photo.png", tiny_image_bytes(0, "PNG")), "is a PNG image, not a checkpoint"),
    "npy": (_npy, "is a NumPy array (.npy), not a checkpoint"),
    "npz": (_npz, "is a NumPy archive (.npz)"),
    "yaml": (_write("config.yaml", open(os.path.join(REPO_ROOT, "configs", "demo.yaml"), "rb").read()),
             "is a text file (YAML, a config or notes?), not a checkpoint"),
    "zip": (_zip_not_torch, "zip archive that is not a PyTorch checkpoint (no data.pkl; members: readme.txt)"),
    "generator": (lambda tmp_path, _: DEMO_GENERATOR, "a StyleGAN2 generator checkpoint ('g_ema'), not an E2Style checkpoint"),
    "other model": (_other_model, "another model's checkpoint (its state_dict holds the modules decoder, encoder)"),
    "bare state dict": (_bare_state_dict, "a bare state dict of 2 tensors"),
    "plain pickle of data": (_write("data.pkl", pickle.dumps({"a": [1, 2]}, protocol=4)),
                             "plain Python pickle of data"),
}


def _cli(src, out, checkpoint):
    return run_pipeline.main(["--set", f"input.url={src}", "--set", f"output.url={out}", "--set",
                              f"model.checkpoint={checkpoint}", "--set", "align.enabled=false", "--set", "progress=false"])


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(tiny_image_bytes(1, "PNG", size=32))
    return src


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_checkpoint_is_named_exit_2_nothing_written(case, tmp_path, photos, tiny_checkpoint, capsys):
    make, words = CASES[case]
    path = make(tmp_path, tiny_checkpoint)
    out = tmp_path / "out"
    assert _cli(photos, out, path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert "model.checkpoint" in err and str(path) in err and words in err, err
    assert "unpickling" not in err and "weights_only" not in err, err  # not the one case that is a refusal
    assert not out.exists()


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_pickle_that_would_run_code_is_refused_without_advice_to_disable_safety(container, tmp_path, photos, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {}, "opts": {"x": _RunsCode(str(marker))}}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    out = tmp_path / "out"
    assert _cli(photos, out, path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "refused to load" in err and "could run code" in err, err
    if container == "torch.save":
        assert "io.open" in err or "builtins.open" in err, err  # the global it would have imported, named
    assert "weights_only" not in err and "False" not in err and "trust" not in err, err
    assert not marker.exists() and not out.exists()


def test_safetensors_whose_header_length_begins_like_a_pickle_is_safetensors(tmp_path):
    """A safetensors file starts with its header's length (8 bytes, little-endian): 0x80 there must not read
    as a pickle's first byte (an E2Style checkpoint's header happened to be 128 + 256 k bytes long)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x180 - len(header))   # the length's first byte is 0x80
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0))
    assert path.read_bytes()[0] == 0x80
    assert sniff_checkpoint(path) == SAFETENSORS
    assert load_file(str(path))["w"].tolist() == [1.0]   # a valid file, as the library reads it
