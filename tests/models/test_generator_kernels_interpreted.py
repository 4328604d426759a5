"""The generator's fused Triton kernel (models/stylegan2_kernels.py), executed by Triton's interpreter on the CPU,
against the float64 official StyledConv.

The interpreter must be chosen before ``triton`` is imported, and the other tests import the models normally, so
the checks run in a process of their own: this file run as a script with TRITON_INTERPRET=1 (the checks print
PASS lines; the test asserts every check passed).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers.interpreter_run import run_checks_interpreted
from helpers.styled_conv_checks import (check_kernel_against_official, check_self_check_catches, per_sample_error,
                                        random_generator, run_checks_main)
import models.stylegan2 as stylegan2
import models.stylegan2_kernels as kernels

# Shapes off the kernel's tiles (masks along pixels, input and output channels), per-sample and shared noise.
SHAPES = [(2, 9, 13, 40, 24, True), (3, 16, 16, 32, 64, False), (1, 5, 7, 8, 16, True)]
# Launch settings run on every shape: None (the interpreter's default, the largest tiles) and small tiles, so that
# a layer spans several pixel, input and output channel tiles, the last ones partial.
SETTINGS = [None, (32, 16, 16, 4, 1)]


def check_against_official(dtype: torch.dtype, bound: float) -> None:
    check_kernel_against_official(kernels.styled_conv3x3, lambda weight, _layer: weight.permute(2, 3, 1, 0),
                                  SHAPES, SETTINGS, dtype, bound, upsample=False)


def check_float32_equals_official() -> None:
    check_against_official(torch.float32, 1e-5)


def check_float16_within_the_reduced_precision_bound() -> None:
    # fp16 operands (x * s rounded once, the weight) and output, float32 accumulation: 3e-4 measured here, so
    # an fp16 intermediate rounding (an accumulation or epilogue in fp16) would show.
    check_against_official(torch.float16, 1e-3)


# The device check's batch sizes here (on a GPU: kernels.CHECK_BATCHES, 1 to 128): the interpreter is slow.
CHECK_BATCHES = (1, 2, 3)


def check_device_self_check_passes_and_catches_a_wrong_kernel() -> None:
    for dtype in (torch.float16, torch.float32):  # not bf16: see test_generator_upsample_kernel_interpreted.py
        assert kernels.check_styled_conv_kernel(torch.device("cpu"), 24, 40, dtype, batches=CHECK_BATCHES) is None
    assert kernels.use_styled_conv_kernel("cpu", use_triton=True)
    right = kernels.styled_conv3x3
    wrong = {  # a kernel that drops the noise, and one wrong below the largest batch only
        "relative error": lambda x, s, w, d, noise, nw, bias, **kw: right(x, s, w, d, noise, 0.0, bias, **kw),
        "differs": lambda x, s, w, d, noise, nw, bias, **kw: right(x, s, w, d, noise, nw, bias, **kw) * (
            1.01 if len(x) < max(CHECK_BATCHES) else 1.0),
    }
    check_self_check_catches(kernels, "styled_conv3x3", lambda: kernels.check_styled_conv_kernel(
        torch.device("cpu"), 32, 32, batches=CHECK_BATCHES), wrong)


def check_bad_shapes_are_named() -> None:
    x = torch.zeros(2, 4, 4, 8)
    try:
        kernels.styled_conv3x3(x, torch.zeros(2, 8), torch.zeros(3, 3, 16, 8), torch.zeros(2, 8), torch.zeros(1, 4, 4), 0.0,
                       torch.zeros(8))
    except ValueError as e:
        assert "(3, 3, Cin, Cout)" in str(e), e
    else:
        raise AssertionError("a weight of the wrong input channels was accepted")


def check_generator_with_fused_layers_equals_the_torch_path() -> None:
    """Generator.set_fused_styled_convs(upsample=False): the 32 and 64 px non-upsampling layers through the kernel
    (float32) give the shared form's image; the kernel ran (a fused layer's forward is not the torch one). Both
    kernels together: tests/models/test_generator_upsample_kernel_interpreted.py."""
    G = random_generator()
    G.set_modconv_mode("shared")
    w = torch.randn(2, G.n_latent, 512)
    calls = []
    right = kernels.styled_conv3x3
    with torch.no_grad():
        ref = G.synthesis(w)
        G.set_fused_styled_convs(32, upsample=False)
        assert [bool(layer.fused_dtypes) for layer in G.convs] == [False] * 5 + [True, False, True]
        try:  # the generator's launches, counted
            stylegan2.styled_conv3x3 = lambda *args, **kw: calls.append(args[0].shape) or right(*args, **kw)
            out = G.synthesis(w)
        finally:
            stylegan2.styled_conv3x3 = right
    assert [c[1] for c in calls] == [32, 64], calls  # NHWC inputs of the two fused layers
    err = per_sample_error(out, ref)
    assert err <= 1e-5, f"fused generator: per-sample relative error {err:.2e}"
    print(f"  generator 64 px, fused at 32 and 64 px: {err:.1e}")


CHECKS = [check_float32_equals_official, check_float16_within_the_reduced_precision_bound,
          check_device_self_check_passes_and_catches_a_wrong_kernel, check_bad_shapes_are_named,
          check_generator_with_fused_layers_equals_the_torch_path]


@pytest.mark.slow
def test_fused_styled_conv_kernel_under_the_interpreter():
    print(run_checks_interpreted(os.path.abspath(__file__), [], [c.__name__ for c in CHECKS]))


if __name__ == "__main__":
    run_checks_main(CHECKS)
