"""The generator's fused upsampling StyledConv (models/stylegan2_upsample_kernel.py): its phase form in float64
against the official layer (transposed convolution, then the blur), and the Triton kernel, executed by Triton's
interpreter on the CPU, against the float64 official StyledConv, per sample.

The interpreter must be chosen before ``triton`` is imported, and the other tests import the models normally, so
the kernel checks run in a process of their own: this file run as a script with TRITON_INTERPRET=1 (the checks
print PASS lines; the test asserts every check passed).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers.interpreter_run import run_checks_interpreted
from helpers.official_fixture import official_generator_checkpoint
from helpers.styled_conv_checks import (check_kernel_against_official, check_self_check_catches, layer_inputs,
                                        modulation_operands, official_layer, per_sample_error, random_generator,
                                        run_checks_main)
import models.stylegan2 as stylegan2
import models.stylegan2_kernels as conv_kernels
import models.stylegan2_upsample_kernel as up
from models.stylegan2 import Generator, StyledConv, default_channels

# (batch, input height, input width, in channels, out channels, per-sample noise): pixels, input and output channels
# off the tiles.
SHAPES = [(2, 5, 7, 40, 24, True), (3, 8, 8, 32, 64, False), (1, 3, 9, 8, 16, True)]
# Launch settings run on every shape: None (the interpreter's default, the largest tiles) and small tiles, so that
# a layer spans several pixel, input and output channel tiles, the last ones partial.
SETTINGS = [None, (16, 16, 16, 4, 1), (32, 16, 32, 4, 1)]
CHECK_BATCHES = (1, 2, 3)  # the device check's batch sizes here (on a GPU: 1 to 128)


def phase_weights(weight: torch.Tensor, layer: StyledConv) -> torch.Tensor:
    """The upsampling kernel's weights from the layer's (Cout, Cin, 3, 3) weight and its blur."""
    return up.upsample_phase_weights(weight, layer.conv.blur.kernel)


@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_phase_form_equals_the_official_layer_in_float64(i):
    """The four forward 3x3 convolutions with the host's combined weights, interleaved, and the epilogue: the
    official StyledConv (per-sample transposed convolution, blur, noise, bias, activation) to rounding."""
    b, h, w, cin, cout, per_sample_noise = SHAPES[i]
    layer = official_layer(cin, cout, seed=i, upsample=True)
    x, style, noise = layer_inputs(layer, b, h, w, per_sample_noise, seed=100 + i)
    with torch.no_grad():
        ref = layer(x, style, noise=noise).permute(0, 2, 3, 1)
        s, weight, demod = modulation_operands(layer, style)
        out = up.styled_upconv3x3_reference(x.permute(0, 2, 3, 1), s, phase_weights(weight, layer), demod, noise[:, 0],
                                            float(layer.noise.weight), layer.activate.bias)
    assert out.shape == ref.shape == (b, 2 * h, 2 * w, cout)
    assert per_sample_error(out, ref) <= 1e-10


def test_fused_layer_selection():
    """set_fused_styled_convs: by size (layer k of convs at 8 * 2 ** (k // 2) px), upsampling layers or not, per
    operand dtype where ``trusted`` says so; None: none."""
    G = Generator(64, channels=default_channels(2, 64))
    G.set_fused_styled_convs(32, upsample=False)
    assert [bool(layer.fused_dtypes) for layer in G.convs] == [False] * 5 + [True, False, True]
    half, bf16 = torch.float16, torch.bfloat16
    G.set_fused_styled_convs(16, dtypes=(half, bf16), trusted=lambda layer, d: layer.conv.upsample or d == half)
    assert [layer.fused_dtypes for layer in G.convs] == [frozenset()] * 2 + [{half, bf16}, {half}] * 3
    G.set_fused_styled_convs(None)
    assert all(not layer.fused_dtypes for layer in G.convs)


@pytest.mark.parametrize("cin, cout", [(32, 32), (64, 32), (128, 64), (256, 128), (8, 16)])
def test_the_device_check_covers_every_setting_the_autotuner_may_pick(cin, cout):
    """The checks run fitting_settings; the autotuner picks among the configs prune_configs keeps: the same."""
    for settings in (conv_kernels.CONV_SETTINGS, up.UPSAMPLE_SETTINGS):
        kept = conv_kernels.prune_configs(conv_kernels.triton_configs(settings), {"H": 16}, CIN=cin, COUT=cout)
        as_settings = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                       for c in kept]
        assert as_settings == conv_kernels.fitting_settings(settings, cin, cout)
        assert all(t[1] <= max(32, cout) and t[2] <= max(32, cin) for t in as_settings) or len(as_settings) == 1


def check_against_official(dtype: torch.dtype, bound: float) -> None:
    check_kernel_against_official(up.styled_upconv3x3, phase_weights, SHAPES, SETTINGS, dtype, bound, upsample=True)


def check_float32_equals_official() -> None:
    check_against_official(torch.float32, 1e-5)


def check_float16_within_the_reduced_precision_bound() -> None:
    # fp16 operands (x * s rounded once, the phase weights) and output, float32 accumulation: an fp16
    # intermediate rounding (an accumulation or epilogue in fp16) would show.
    check_against_official(torch.float16, 1e-3)


def check_official_fixture_layers() -> None:
    """The official fixture's 256 px StyledConvs (256 -> 128 channels upsampling, 128 -> 128), its weights, on a
    small input: both kernels in float32 and fp16 against the float64 official layers, per sample."""
    g = Generator(256, channels=default_channels(2))
    g.load_state_dict(official_generator_checkpoint()["g_ema"], strict=False)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 256, 6, 10, generator=gen, dtype=torch.float64)
    style = torch.randn(2, 2, 512, generator=gen, dtype=torch.float64)
    noise = [torch.randn(1, 1, 12, 20, generator=gen, dtype=torch.float64) for _ in range(2)]
    layers = [g.convs[-2].double(), g.convs[-1].double()]
    with torch.no_grad():
        for layer in layers:
            layer.noise.weight.fill_(0.5)  # the fixture's are zero: the noise must count
        ref = layers[1](layers[0](x, style[:, 0], noise[0]), style[:, 1], noise[1])
        for dtype, bound in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            for layer in layers:
                layer.float().conv.mode = "shared"
                layer.fused_dtypes = frozenset([dtype])
            h = x.to(dtype)
            with torch.autocast("cpu", enabled=False):
                for k, layer in enumerate(layers):
                    h = layer(h, style[:, k].float(), noise[k].float())
            for layer in layers:
                layer.double().conv.mode = "grouped"
                layer.fused_dtypes = frozenset()
            err = per_sample_error(h, ref)
            assert h.dtype == dtype and err <= bound, f"{dtype}: per-sample relative error {err:.2e} > {bound:.0e}"
            print(f"  fixture 256 px layers, {dtype}: {err:.1e}")


# Not bf16: the interpreter's tl.dot multiplies bf16 operands wrongly (2e10 off on a 16x16 product of normals, triton
# 3.5); the device check covers bf16 on the GPU.
INTERPRETED_DTYPES = (torch.float16, torch.float32)


def check_device_self_check_passes_and_catches_a_wrong_kernel() -> None:
    for dtype in INTERPRETED_DTYPES:
        assert up.check_upsample_kernel(torch.device("cpu"), 24, 40, dtype, batches=CHECK_BATCHES) is None
    assert up.use_upsample_kernel("cpu", use_triton=True)
    right = up.styled_upconv3x3

    def phases_swapped(x, s, pw, d, noise, nw, bias, **kw):
        return right(x, s, pw[[1, 0, 3, 2]], d, noise, nw, bias, **kw)

    wrong = {"relative error": phases_swapped,  # the columns' phases swapped, and one wrong below the largest batch
             "differs": lambda x, *args, **kw: right(x, *args, **kw) * (1.01 if len(x) < max(CHECK_BATCHES) else 1.0)}
    check_self_check_catches(up, "styled_upconv3x3", lambda: up.check_upsample_kernel(
        torch.device("cpu"), 32, 32, batches=CHECK_BATCHES), wrong)


def check_bad_shapes_are_named() -> None:
    x = torch.zeros(2, 4, 4, 8)
    for weight, noise, says in ((torch.zeros(3, 3, 8, 8), torch.zeros(1, 8, 8), "(4, 3, 3, Cin, Cout)"),
                                (torch.zeros(4, 3, 3, 8, 8), torch.zeros(1, 4, 4), "(1 or 2, 8, 8)")):
        try:
            up.styled_upconv3x3(x, torch.zeros(2, 8), weight, torch.zeros(2, 8), noise, 0.0, torch.zeros(8))
        except ValueError as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"accepted: weight {tuple(weight.shape)}, noise {tuple(noise.shape)}")


def check_generator_with_both_fused_kernels() -> None:
    """Generator.set_fused_styled_convs(32): the 32 and 64 px layers, upsampling ones included, through the kernels
    (float32) give the official float64 generator's image per sample; each kernel ran where it should."""
    G = random_generator()
    w = torch.randn(2, G.n_latent, 512)
    with torch.no_grad():
        ref = G.double().synthesis(w.double())  # the official (grouped) form
        G.float().set_modconv_mode("shared")
        G.set_fused_styled_convs(32)
        assert [bool(layer.fused_dtypes) for layer in G.convs] == [False] * 4 + [True] * 4
        calls = {"conv": [], "up": []}
        kernels = {"conv": conv_kernels.styled_conv3x3, "up": up.styled_upconv3x3}
        try:  # the generator's launches, counted
            stylegan2.styled_conv3x3 = lambda *a, **kw: calls["conv"].append(a[0].shape) or kernels["conv"](*a, **kw)
            stylegan2.styled_upconv3x3 = lambda *a, **kw: calls["up"].append(a[0].shape) or kernels["up"](*a, **kw)
            out = G.synthesis(w)
        finally:
            stylegan2.styled_conv3x3, stylegan2.styled_upconv3x3 = kernels["conv"], kernels["up"]
        G.set_fused_styled_convs(None)
        assert all(not layer.fused_dtypes for layer in G.convs)
    assert [c[1] for c in calls["up"]] == [16, 32] and [c[1] for c in calls["conv"]] == [32, 64], calls  # NHWC
    err = per_sample_error(out, ref)
    assert err <= 1e-5, f"fused generator: per-sample relative error {err:.2e}"
    print(f"  generator 64 px, fused at 32 and 64 px: {err:.1e}")


CHECKS = [check_float32_equals_official, check_float16_within_the_reduced_precision_bound,
          check_official_fixture_layers, check_device_self_check_passes_and_catches_a_wrong_kernel,
          check_bad_shapes_are_named, check_generator_with_both_fused_kernels]


@pytest.mark.slow
def test_fused_upsampling_styled_conv_kernel_under_the_interpreter():
    print(run_checks_interpreted(os.path.abspath(__file__), [], [c.__name__ for c in CHECKS]))


if __name__ == "__main__":
    run_checks_main(CHECKS)
