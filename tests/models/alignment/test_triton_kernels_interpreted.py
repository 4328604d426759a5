"""The GPU paths' Triton kernels, executed by Triton's interpreter on the CPU, equal the torch paths bit for bit.

On a GPU the face detector, the landmark predictor and the crop's QUAD transform run Triton kernels that
repeat dlib's and Pillow's arithmetic; they are used only where they equal the torch path, which the tests
against dlib and Pillow check on CPU. CI has no GPU, so the kernels run here under Triton's interpreter
(TRITON_INTERPRET=1), which executes their code with numpy on CPU tensors. The interpreter must be chosen
before ``triton`` is imported and the other tests import the models normally, so each group of kernels runs
in a process of its own (tests/helpers/triton_interpreter_checks.py, which holds the checks and their inputs); a
test passes when that process reports every check of its group passed (``-s`` shows each check's time).
"""
from __future__ import annotations

import importlib
import os
import pkgutil

import pytest

import models.alignment
from helpers import triton_interpreter_checks as checks
from helpers.interpreter_run import run_checks_interpreted

# About two minutes in all on 2 cores: the interpreter runs each program of a launch in Python.
pytestmark = pytest.mark.slow

MODULES_WITH_KERNELS = ["models.alignment.pyramid", "models.alignment.fhog", "models.alignment.filters",
                        "models.alignment.level_launch", "models.alignment.landmarks", "models.alignment.resample"]


def run_group(group: str) -> None:
    print(run_checks_interpreted(checks.__file__, [group], checks.check_names(group)))


def test_every_triton_function_has_a_check():
    # A kernel added to one of the modules must join a group of tests/helpers/triton_interpreter_checks.py, and every
    # module of the alignment ports that defines Triton functions must be listed here.
    with_triton = set()
    for info in pkgutil.iter_modules(models.alignment.__path__):
        source = open(os.path.join(models.alignment.__path__[0], info.name + ".py")).read()
        if "@triton.jit" in source:
            with_triton.add(f"models.alignment.{info.name}")
    assert with_triton == set(MODULES_WITH_KERNELS)
    checked = {(module, name) for group in checks.FUNCTIONS.values() for module, names in group.items()
               for name in names}
    defined = {(module, name) for module in MODULES_WITH_KERNELS
               for name in checks.triton_functions(importlib.import_module(module))}
    assert defined, "no Triton function found: is triton importable in this environment?"
    assert defined - checked == set(), "Triton functions that no interpreter check runs"
    assert checked - defined == set(), "checks name functions the modules no longer define"


def test_detector_pyramid_resize_kernel():
    # pyramid.check_resize_kernels (the device probe): pyramid_down and pyramid_up of two sizes in a batch.
    run_group("detector-resize")


def test_detector_fhog_kernels():
    # fhog.check_fhog_kernels (the device probe): pixel votes, cell histograms, block energy and features of two
    # quantised images of other sizes in a batch, then two levels of other shapes in one launch per kernel (the
    # level search), one image with no HOG cell.
    run_group("detector-fhog")


def test_detector_filter_kernel():
    # The fused filter kernel over several row tiles and column blocks, two sizes, real and padding terms; then
    # two levels in one launch (the level search) with the threshold test's hits.
    run_group("detector-filters")


def test_detector_whole_detect_with_every_triton_group():
    # detect() on a real face and another photograph of another size in one batch, all Triton groups on: every
    # level's window scores and threshold tests from the batch's buffers.
    run_group("detector-detect")


def test_landmark_kernels():
    # landmarks.check_landmark_kernels (the device probe): the tree and leaf kernels per cascade (many tied
    # splits); and predict() on two images; two tree shapes.
    run_group("landmarks")


def test_quad_transform_kernel():
    # The QUAD transform on its own (sources, windows, quads across edges) and inside crop_faces.
    run_group("quad")
