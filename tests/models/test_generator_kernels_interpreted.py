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
import models.stylegan2 as stylegan2
import models.stylegan2_kernels as kernels
from models.stylegan2 import Generator, StyledConv, default_channels

# Shapes off the kernel's tiles (masks along pixels, input and output channels), per-sample and shared noise.
SHAPES = [(2, 9, 13, 40, 24, True), (3, 16, 16, 32, 64, False), (1, 5, 7, 8, 16, True)]
# Launch settings run on every shape: None (the interpreter's default, the largest tiles) and small tiles, so that
# a layer spans several pixel, input and output channel tiles, the last ones partial.
SETTINGS = [None, (32, 16, 16, 4, 1)]


def official_layer(cin: int, cout: int, seed: int):
    """A StyledConv (3x3, no upsampling) in float64 with non-zero noise strength and bias."""
    torch.manual_seed(seed)
    layer = StyledConv(cin, cout, 3, style_dim=32).double()
    with torch.no_grad():
        layer.noise.weight.fill_(0.7)
        layer.activate.bias.normal_()
    return layer


def kernel_arguments(layer, style: torch.Tensor):
    """The kernel's operands from the layer's parameters: styles, (3, 3, Cin, Cout) weight, demodulation."""
    conv = layer.conv
    s = conv.modulation(style)
    weight = conv.scale * conv.weight[0]  # (out, in, 3, 3)
    demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + conv.eps)
    return s, weight.permute(2, 3, 1, 0).contiguous(), demod


def check_against_official(dtype: torch.dtype, bound: float) -> None:
    for i, (b, h, w, cin, cout, per_sample_noise) in enumerate(SHAPES):
        layer = official_layer(cin, cout, seed=i)
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
        style = torch.randn(b, 32, generator=gen, dtype=torch.float64)
        noise = torch.randn(b if per_sample_noise else 1, 1, h, w, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            ref = layer(x, style, noise=noise).permute(0, 2, 3, 1)  # the official (grouped) form, float64
            s, weight, demod = kernel_arguments(layer, style)
            for settings in SETTINGS:
                out = kernels.styled_conv3x3(x.permute(0, 2, 3, 1).to(dtype), s.float(), weight.float(),
                                             demod.float(), noise[:, 0].float(), float(layer.noise.weight),
                                             layer.activate.bias.float(), settings=settings)
                assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape)
                err = ((out.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
                assert err <= bound, f"{dtype} {SHAPES[i]} {settings}: per-sample relative error {err:.2e} > {bound:.0e}"
        print(f"  {dtype} {SHAPES[i]}: {err:.1e}")


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
    for what, kernel in wrong.items():
        try:
            kernels.styled_conv3x3 = kernel
            problem = kernels.check_styled_conv_kernel(torch.device("cpu"), 32, 32, batches=CHECK_BATCHES)
        finally:
            kernels.styled_conv3x3 = right
        assert problem is not None and what in problem, (what, problem)


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
    torch.manual_seed(0)
    G = Generator(64, channels=default_channels(2, 64))
    for name, p in G.named_parameters():
        if name.endswith("noise.weight") or "bias" in name:
            p.data.normal_()
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
    err = ((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
    assert err <= 1e-5, f"fused generator: per-sample relative error {err:.2e}"
    print(f"  generator 64 px, fused at 32 and 64 px: {err:.1e}")


CHECKS = [check_float32_equals_official, check_float16_within_the_reduced_precision_bound,
          check_device_self_check_passes_and_catches_a_wrong_kernel, check_bad_shapes_are_named,
          check_generator_with_fused_layers_equals_the_torch_path]


@pytest.mark.slow
def test_fused_styled_conv_kernel_under_the_interpreter():
    print(run_checks_interpreted(os.path.abspath(__file__), [], [c.__name__ for c in CHECKS]))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test (TRITON_INTERPRET=1 before triton loads)"
    for check in CHECKS:
        check()
        print(f"PASS {check.__name__}", flush=True)
