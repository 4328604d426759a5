"""The run's life cycle around the scheduler: embedded Ray stays embedded, and a refused run writes nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import run_pipeline
from helpers.inputs import tiny_image_bytes
from helpers.paths import REPO_ROOT



def _inputs(tmp_path, n=2):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        (src / f"im{i}.png").write_bytes(tiny_image_bytes(i, "PNG", size=32))
    return src


def _cli(src, out, checkpoint, *sets):
    args = ["--set", f"input.url={src}", "--set", f"output.url={out}", "--set", f"model.checkpoint={checkpoint}",
            "--set", "align.enabled=false", "--set", "progress=false"]
    for s in sets:
        args += ["--set", s]
    return run_pipeline.main(args)


def test_refused_rerun_and_bad_stages_leave_the_output_as_it_was(tmp_path, tiny_checkpoint, tiny_checkpoint_other, capsys):
    """An output holding files of an earlier run: a rerun refused for its checkpoint, its stages or its input
    changes no byte there (the orphan an interrupted run left is still there too)."""
    src = _inputs(tmp_path)
    out = tmp_path / "out"
    (out / "latents").mkdir(parents=True)
    (out / "latents" / "orphan.parquet").write_bytes(b"left by a crash")
    (out / "_run.json").write_text('{"fingerprint": "something else", "fingerprint_values": {}}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert _cli(src, out, tiny_checkpoint, "model.stages=3") == 2
    assert "model.stages: must be in 1..2" in capsys.readouterr().err
    assert _cli(src, out, tiny_checkpoint_other) == 2
    assert "refused" in capsys.readouterr().err
    assert _cli(tmp_path / "missing", out, tiny_checkpoint, "output.overwrite=true") == 2
    assert "input.url" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_mode_ignores_a_stale_cluster_address(tmp_path, tiny_checkpoint):
    """ray.address null starts its own local Ray even where a cluster's address file is left in Ray's temp
    folder (``ray start`` writes it; a stopped or crashed cluster leaves it behind)."""
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        src = _inputs(tmp_path, 1)
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "run_pipeline.py"), "--set", f"input.url={src}",
             "--set", f"output.url={tmp_path / 'out'}", "--set", f"model.checkpoint={tiny_checkpoint}",
             "--set", "align.enabled=false", "--set", "progress=false", "--set", "ray.num_cpus=2"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "out" / "_SUCCESS").exists()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
