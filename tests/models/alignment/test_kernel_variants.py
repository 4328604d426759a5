"""The detector's Triton kernels are compiled once per process, whatever the photos.

Triton compiles a kernel anew for each specialisation of its arguments, among them whether each pointer is
16-byte aligned; a table or a pyramid level viewed at an arbitrary offset of a shared buffer makes new variants
batch after batch (on an H100, before models/alignment/device.py's DEVICE_ALIGNMENT: 22 variants of the resize
kernel for one chunk of 64 photos, 28 after two, the detector's first calls taking minutes of compilation).
benchmarks/count_detector_work.py runs the detector on the CPU with every kernel replaced by a stub that records
the specialisation Triton's own binder gives each launch for an sm_90 device; here, over chunks of photos of
other sizes, each kernel must need exactly one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers.interpreter_run import TRITON_MISSING
from helpers.paths import REPO_ROOT, with_test_imports

DETECTOR_KERNELS = {"_place_photos_kernel", "_resize_rgb_kernel", "_orient_mag_kernel", "_cell_hist_kernel",
                    "_block_energy_kernel", "_features_kernel", "_filter_rows_kernel"}


def test_each_detector_kernel_has_one_compiled_variant_over_chunks_of_any_sizes(tmp_path):
    assert importlib.util.find_spec("triton") is not None, TRITON_MISSING
    out = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "count_detector_work.py"), "--stub-kernels",
         "--photos", "12", "--chunk", "4", "--min-side", "300", "--max-side", "900", "--out", str(out)],
        env=with_test_imports(dict(os.environ)), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chunks = json.loads(out.read_text())
    assert len(chunks) == 3
    for k, chunk in enumerate(chunks):
        variants = chunk["compiled variants so far"]
        assert set(variants) == DETECTOR_KERNELS, variants
        assert all(n == 1 for n in variants.values()), f"after chunk {k}: {variants}"
