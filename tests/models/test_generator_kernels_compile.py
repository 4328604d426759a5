"""The generator's fused StyledConv kernels compile for a GPU (sm_90) on a machine without one (why:
tests/helpers/triton_compile.py): each kernel at the 1024 px layers' channels, fp16 on tensor cores with every
launch setting the autotuner may pick there, and float32 (IEEE dots) with the first."""
from __future__ import annotations

import pytest

from helpers.triton_compile import compile_for_sm90, requires_triton
from models import stylegan2_kernels, stylegan2_upsample_kernel

pytestmark = [pytest.mark.slow, requires_triton]

# The kernels' pointer arguments in launch order (prepare_operands: styles, demodulation, bias and the noise
# weight in float32; x, weight and output in the layer's dtype).
_POINTERS = ("x_ptr", "s_ptr", "w_ptr", "demod_ptr", "noise_ptr", "bias_ptr", "out_ptr", "noise_weight_ptr")


def _types(dtype: str) -> dict:
    float32 = {"s_ptr", "demod_ptr", "bias_ptr", "noise_weight_ptr"}
    return {n: "*fp32" if n in float32 else f"*{dtype}" for n in _POINTERS}


def _compile_all(kernel, settings: list[tuple], cin: int, cout: int) -> None:
    fitting = stylegan2_kernels.fitting_settings(settings, cin, cout)
    runs = [("fp16", s, False) for s in fitting] + [("fp32", fitting[0], True)]
    for dtype, (block_m, block_n, block_k, warps, stages), ieee in runs:
        compile_for_sm90(kernel, _types(dtype),
                         {"CIN": cin, "COUT": cout, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "IEEE": ieee}, num_warps=warps, num_stages=stages)


def test_styled_conv3x3_kernel_compiles():
    _compile_all(stylegan2_kernels._styled_conv3x3_kernel, stylegan2_kernels.CONV_SETTINGS, 32, 32)


def test_styled_upconv3x3_kernel_compiles():
    _compile_all(stylegan2_upsample_kernel._styled_upconv3x3_kernel, stylegan2_upsample_kernel.UPSAMPLE_SETTINGS,
                 64, 32)
