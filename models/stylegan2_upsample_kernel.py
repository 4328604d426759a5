"""Fused Triton kernel for the StyleGAN2 generator's upsampling StyledConv (issue 32): the modulated transposed 3x3
convolution (stride 2) and the [1, 3, 3, 1] FIR blur after it, with the demodulation, noise, bias and leaky ReLU,
in one NHWC kernel.

The phase form. The official layer is T = conv_transpose2d(x, w, stride 2) ((2H+1) x (2W+1)), then the blur:
upfirdn2d(T, k, pad (1, 1)) (2H x 2W). Along one axis, out[Y] = sum_i x[i] C[Y - 2i] with the combined 6-tap kernel
C[d] = sum_t flip(k)[t] w[d + t - 1], d = -2..3 (the 3-tap weight convolved with the 4-tap blur; in 2-D,
C = conv2d(pad(w, 3), flip(k)): ModulatedConv2d.upsample_kernel's 6x6 kernel). Output row 2m + p (phase p) takes
x[m + a] with C[p - 2a], a = -1, 0, 1: each of the four output phases (py, px) is a forward 3x3 convolution
(padding 1) of the input at its own resolution with the weights C[py - 2a, px - 2b] (upsample_phase_weights,
computed on the host). So no transposed convolution (cuDNN's dgrad kernels), no (2H+1)^2 intermediate and no
blur pass: one program loads each modulated input tile once per tap and multiplies it by the four phases' weights
(four float32 accumulators), then writes the four output phases through one epilogue (models/stylegan2_kernels.py).

Reads top-down: the phase weights and the torch reference (the phase form, in any dtype; float64 equals the
official layer), the kernel, the launcher, the device check (check_fused_kernel, as the non-upsampling kernel's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernel_check import tl, triton, use_kernels
from .stylegan2_kernels import (AUTOTUNE_KEY, CHECK_BATCHES, CHECK_SIZE, check_fused_kernel, epilogue_operands,
                                epilogue_reference, epilogue_store, fitting_settings, launch, modulated_tile,
                                prepare_operands, program_tile, prune_configs, random_operands, tap_pixels,
                                triton_configs)


def upsample_phase_weights(weight: torch.Tensor, blur_kernel: torch.Tensor) -> torch.Tensor:
    """weight (Cout, Cin, 3, 3) (scale included), blur_kernel (4, 4) (the layer's Blur.kernel, factor 4 included)
    -> (4, 3, 3, Cin, Cout): for phase py * 2 + px and tap (a + 1, b + 1), the weight of input pixel
    (m + a, n + b) in output pixel (2m + py, 2n + px)."""
    o, i, k, _ = weight.shape
    if k != 3 or blur_kernel.shape != (4, 4):
        raise ValueError(f"the phase form is for a 3x3 weight and a 4x4 blur, got {k}x{k} and "
                         f"{tuple(blur_kernel.shape)}")
    fir = torch.flip(blur_kernel.to(weight.dtype), [0, 1])
    combined = F.conv2d(F.pad(weight.reshape(o * i, 1, 3, 3), [3, 3, 3, 3]), fir[None, None]).reshape(o, i, 6, 6)
    # Along one axis, phase p at tap a (-1, 0, 1) takes the combined kernel's index d + 2 = p - 2a + 2: indices
    # (4, 2, 0) for p = 0, (5, 3, 1) for p = 1. Slices, not an index tensor (no host copy under CUDA graph capture).
    rows = torch.stack([combined[:, :, p::2].flip(2) for p in (0, 1)], dim=2)  # (o, i, py, a, 6)
    phases = torch.stack([rows[..., p::2].flip(-1) for p in (0, 1)], dim=4)  # (o, i, py, a, px, b)
    return phases.permute(2, 4, 3, 5, 1, 0).reshape(4, 3, 3, i, o)


def upsample_conv_phases(xs: torch.Tensor, phase_weight: torch.Tensor) -> torch.Tensor:
    """NHWC modulated input (B, H, W, Cin), phase weights (4, 3, 3, Cin, Cout) -> (B, 2H, 2W, Cout): the transposed
    convolution and the blur as four forward 3x3 convolutions, their outputs interleaved."""
    b, h, w, _ = xs.shape
    x = xs.permute(0, 3, 1, 2)
    phases = [F.conv2d(x, phase_weight[p].permute(3, 2, 0, 1).to(x.dtype), padding=1) for p in range(4)]
    out = torch.stack(phases, dim=0).reshape(2, 2, b, -1, h, w)  # (py, px, B, Cout, H, W)
    return out.permute(2, 4, 0, 5, 1, 3).reshape(b, 2 * h, 2 * w, -1)


def styled_upconv3x3_reference(x: torch.Tensor, s: torch.Tensor, phase_weight: torch.Tensor, demod: torch.Tensor,
                               noise: torch.Tensor, noise_weight: float, bias: torch.Tensor) -> torch.Tensor:
    """NHWC x (B, H, W, Cin), styles (B, Cin), phase weights (4, 3, 3, Cin, Cout), demodulation (B, Cout), noise
    (B or 1, 2H, 2W), bias (Cout,) -> (B, 2H, 2W, Cout): the upsampling StyledConv's shared form in x's dtype."""
    out = upsample_conv_phases(x * s[:, None, None, :].to(x.dtype), phase_weight)
    return epilogue_reference(out, demod, noise, noise_weight, bias)


# (BLOCK_M input pixels, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries on CUDA: four accumulators
# per program, so BLOCK_M x BLOCK_N at most 4096 at 4 warps and 8192 at 8 (the accumulators: 128 float32 registers
# per thread).
UPSAMPLE_SETTINGS = [(64, 32, 32, 4, 3), (128, 32, 32, 4, 3), (128, 32, 64, 8, 3), (64, 64, 32, 4, 3),
                     (128, 64, 32, 8, 3), (64, 128, 64, 8, 3)]


if triton is not None:
    @triton.jit
    def _styled_upconv3x3_kernel(x_ptr, s_ptr, w_ptr, demod_ptr, noise_ptr, bias_ptr, out_ptr, noise_weight_ptr,
                                 H, W, noise_batch_stride, CIN: tl.constexpr, COUT: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 IEEE: tl.constexpr):
        # One program: BLOCK_M input pixels of one image (row-major over H x W) by BLOCK_N output channels, and the
        # 2x2 output pixels of each (the four phases).
        b, offs_m, m_ok, h, w, offs_n, n_ok = program_tile(H, W, COUT, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_image = x_ptr + b.to(tl.int64) * H * W * CIN
        acc00 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc01 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc10 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc11 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in tl.static_range(9):
            inside, pixel = tap_pixels(h, w, m_ok, H, W, tap)
            for k0 in range(0, CIN, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < CIN
                xt = modulated_tile(x_image, s_ptr, b, pixel, inside, kk, k_ok, CIN, x_ptr.dtype.element_ty)
                w_tap = w_ptr + (tap * CIN + kk[:, None]) * COUT + offs_n[None, :]  # phase 0; a phase: 9 Cin Cout
                w_ok = k_ok[:, None] & n_ok[None, :]
                w00 = tl.load(w_tap, mask=w_ok, other=0.0)
                w01 = tl.load(w_tap + 9 * CIN * COUT, mask=w_ok, other=0.0)
                w10 = tl.load(w_tap + 18 * CIN * COUT, mask=w_ok, other=0.0)
                w11 = tl.load(w_tap + 27 * CIN * COUT, mask=w_ok, other=0.0)
                if IEEE:
                    acc00 += tl.dot(xt, w00, input_precision="ieee")
                    acc01 += tl.dot(xt, w01, input_precision="ieee")
                    acc10 += tl.dot(xt, w10, input_precision="ieee")
                    acc11 += tl.dot(xt, w11, input_precision="ieee")
                else:
                    acc00 += tl.dot(xt, w00)
                    acc01 += tl.dot(xt, w01)
                    acc10 += tl.dot(xt, w10)
                    acc11 += tl.dot(xt, w11)
        d, bias, noise_weight = epilogue_operands(demod_ptr, bias_ptr, noise_weight_ptr, b, offs_n, n_ok, COUT)
        noise_row = noise_ptr + b * noise_batch_stride
        out_row = out_ptr + b.to(tl.int64) * 4 * H * W * COUT
        top = (2 * h) * (2 * W) + 2 * w  # output pixel (2h, 2w), phase (0, 0)
        epilogue_store(acc00, d, bias, noise_weight, noise_row, out_row, top, m_ok, offs_n, n_ok, COUT)
        epilogue_store(acc01, d, bias, noise_weight, noise_row, out_row, top + 1, m_ok, offs_n, n_ok, COUT)
        epilogue_store(acc10, d, bias, noise_weight, noise_row, out_row, top + 2 * W, m_ok, offs_n, n_ok, COUT)
        epilogue_store(acc11, d, bias, noise_weight, noise_row, out_row, top + 2 * W + 1, m_ok, offs_n, n_ok, COUT)

    _styled_upconv3x3_tuned = triton.autotune(configs=triton_configs(UPSAMPLE_SETTINGS), key=AUTOTUNE_KEY,
                                              prune_configs_by={"early_config_prune": prune_configs})(
        _styled_upconv3x3_kernel)


def styled_upconv3x3(x: torch.Tensor, s: torch.Tensor, phase_weight: torch.Tensor, demod: torch.Tensor,
                     noise: torch.Tensor, noise_weight: torch.Tensor | float, bias: torch.Tensor,
                     settings: tuple | None = None) -> torch.Tensor:
    """styled_upconv3x3_reference as one Triton kernel (arguments as there; x NHWC in fp16, bf16 or float32, the
    rest in float32; noise_weight a number or a one-element tensor). The output (B, 2H, 2W, Cout) has x's dtype.
    ``settings``: see models/stylegan2_kernels.launch."""
    b, h, w, cin = x.shape
    cout = phase_weight.shape[-1]
    ops, noise_weight, stride = prepare_operands("styled_upconv3x3", x, s, phase_weight, (4, 3, 3, cin, cout),
                                                 demod, noise, (2 * h, 2 * w), noise_weight, bias)
    out = torch.empty((b, 2 * h, 2 * w, cout), device=x.device, dtype=x.dtype)
    args = [*ops, out, noise_weight, h, w, stride]
    grid = lambda bm, bn: (triton.cdiv(h * w, bm), triton.cdiv(cout, bn), b)  # noqa: E731
    launch(_styled_upconv3x3_kernel, _styled_upconv3x3_tuned, grid, args, cin, cout, ops[0], settings)
    return out


def check_upsample_kernel(device: torch.device, cin: int = 64, cout: int = 32, dtype: torch.dtype = torch.float16,
                          batches=CHECK_BATCHES, settings: list | None = None) -> str | None:
    """The kernel against the float64 reference of the same rounded operands on ``device`` (check_fused_kernel),
    at a layer's channels and operand dtype, on a (CHECK_SIZE / 2) input: every setting of ``settings`` (default:
    those the autotuner may pick) at every batch size of ``batches``."""
    h, w = CHECK_SIZE[0] // 2, CHECK_SIZE[1] // 2
    ops = random_operands(max(batches), h, w, cin, cout, dtype, taps=36)

    def run(d, noise, setting):
        return styled_upconv3x3(d["x"], d["s"], d["weight"].reshape(4, 3, 3, cin, cout), d["demod"], noise, 0.3,
                                d["bias"], settings=setting)

    def reference(d, noise):
        return styled_upconv3x3_reference(d["x"].double(), d["s"], d["weight"].reshape(4, 3, 3, cin, cout),
                                          d["demod"], noise, 0.3, d["bias"])

    if settings is None:
        settings = fitting_settings(UPSAMPLE_SETTINGS, cin, cout)
    problem = check_fused_kernel(run, reference, ops, (2 * h, 2 * w), dtype, torch.device(device), settings, batches)
    return None if problem is None else f"{cin} -> {cout} channels, {problem}"


def use_upsample_kernel(device, cin: int = 64, cout: int = 32, dtype: torch.dtype = torch.float16,
                        use_triton: bool | None = None) -> bool:
    """Whether the fused upsampling StyledConv kernel serves a layer of these channels and operand dtype on
    ``device`` (kernel_check.use_kernels' rules; checked once per device, shape and dtype)."""
    return use_kernels("generator upsampling styled conv", device, use_triton,
                       lambda d: check_upsample_kernel(d, cin, cout, dtype), variant=(cin, cout, dtype))
