"""Fused Triton kernels for the StyleGAN2 generator's high-resolution layers (issue 32).

At 32-64 channels the 512 and 1024 px layers are bound by memory traffic: the library convolution writes its
output, then the demodulation, noise, bias and activation read and write it again. Here one kernel does a whole
non-upsampling StyledConv over NHWC activations: the modulated 3x3 convolution as an implicit GEMM over the shared
weight (the input scaled by the styles as it is loaded, fp16/bf16 operands on tensor cores, float32 accumulation),
and in its epilogue the demodulation, the noise, the bias and the leaky ReLU with its gain; the activations are
read once per tap and written once.

Reads top-down: the torch reference (the shared form of models/stylegan2.py's StyledConv, in any dtype), the
kernel, its launcher, the device check. The generator runs it where asked (Generator.set_fused_styled_convs, off
by default); E2Style.optimize_for_gpu asks ``use_styled_conv_kernel(device)`` first, which runs the check once per
device and process (models/kernel_check.py, the project's one way to trust a kernel group). The kernel rounds where the
library path does not (operands to fp16 once, the epilogue in float32), so the check is a tolerance against the
float32 reference, not bit equality.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernel_check import tl, triton, use_kernels

LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)
# The device check: a layer of the 1024 px shape's channels on a small image, fp16, against float32.
CHECK_SHAPE = (2, 24, 20, 32, 32)  # batch, height, width, in channels, out channels (edges: not tile multiples)
CHECK_REL_BOUND = 1e-2  # per-sample relative error, the generator's reduced-precision bound (check_gpu.py)


def styled_conv3x3_reference(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, demod: torch.Tensor,
                             noise: torch.Tensor, noise_weight: float, bias: torch.Tensor) -> torch.Tensor:
    """NHWC x (B, H, W, Cin), styles s (B, Cin), weight (3, 3, Cin, Cout) (scale included), demodulation (B, Cout),
    noise (B or 1, H, W), bias (Cout,) -> (B, H, W, Cout): StyledConv's shared form in x's dtype."""
    xs = (x * s[:, None, None, :].to(x.dtype)).permute(0, 3, 1, 2)
    out = F.conv2d(xs, weight.permute(3, 2, 0, 1).to(x.dtype), padding=1) * demod.to(x.dtype)[:, :, None, None]
    out = out + noise_weight * noise[:, None].to(x.dtype) + bias.to(x.dtype)[None, :, None, None]
    return (F.leaky_relu(out, LEAKY_SLOPE) * ACTIVATION_GAIN).permute(0, 2, 3, 1)


if triton is not None:
    @triton.jit
    def _styled_conv3x3_kernel(x_ptr, s_ptr, w_ptr, demod_ptr, noise_ptr, bias_ptr, out_ptr, noise_weight_ptr,
                               H, W, noise_batch_stride, CIN: tl.constexpr, COUT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               IEEE: tl.constexpr):
        # One program: BLOCK_M pixels of one image (row-major over H x W) by BLOCK_N output channels. The channel
        # counts are compile-time constants (a layer's own; the loop over input channels needs a static bound).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < H * W
        n_ok = offs_n < COUT
        h = offs_m // W
        w = offs_m % W
        x_image = x_ptr + b.to(tl.int64) * H * W * CIN
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in tl.static_range(9):
            hh = h + (tap // 3 - 1)
            ww = w + (tap % 3 - 1)
            inside = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)  # zero padding
            pixel = (hh * W + ww).to(tl.int64)
            for k0 in range(0, CIN, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < CIN
                xt = tl.load(x_image + pixel[:, None] * CIN + kk[None, :], mask=inside[:, None] & k_ok[None, :],
                             other=0.0)
                st = tl.load(s_ptr + b * CIN + kk, mask=k_ok, other=0.0)
                # The modulation, on the operand as loaded: x * s rounded to x's dtype once, as the torch path.
                xt = (xt.to(tl.float32) * st[None, :]).to(x_ptr.dtype.element_ty)
                wt = tl.load(w_ptr + (tap * CIN + kk[:, None]) * COUT + offs_n[None, :],
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(xt, wt, input_precision="ieee")
                else:
                    acc += tl.dot(xt, wt)
        # Epilogue in float32: demodulation, noise (one value per pixel), bias, leaky ReLU and its gain.
        d = tl.load(demod_ptr + b * COUT + offs_n, mask=n_ok, other=0.0)
        nz = tl.load(noise_ptr + b * noise_batch_stride + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        noise_weight = tl.load(noise_weight_ptr)  # from the device: no host sync (CUDA graph capture)
        y = acc * d[None, :] + noise_weight * nz[:, None] + bias[None, :]
        y = tl.where(y >= 0.0, y, y * 0.2) * 1.4142135623730951  # LEAKY_SLOPE, ACTIVATION_GAIN
        out = out_ptr + (b.to(tl.int64) * H * W + offs_m[:, None]) * COUT + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def styled_conv3x3(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, demod: torch.Tensor,
                   noise: torch.Tensor, noise_weight: torch.Tensor | float, bias: torch.Tensor, block_m: int = 64,
                   block_n: int = 32, block_k: int = 32, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """styled_conv3x3_reference as one Triton kernel (arguments as there; x contiguous NHWC in fp16, bf16 or
    float32, the rest in float32; noise_weight a number or a one-element tensor). The output has x's dtype. The
    tile sizes and launch settings are not tuned yet (benchmarks/bench_invert.py --layer-bench times a few)."""
    if triton is None:
        raise RuntimeError("styled_conv3x3 needs the triton package")
    b, h, w, cin = x.shape
    cout = weight.shape[-1]
    if weight.shape != (3, 3, cin, cout) or s.shape != (b, cin) or demod.shape != (b, cout) or bias.shape != (cout,):
        raise ValueError(f"styled_conv3x3: shapes x {tuple(x.shape)}, s {tuple(s.shape)}, weight "
                         f"{tuple(weight.shape)}, demod {tuple(demod.shape)}, bias {tuple(bias.shape)} do not fit "
                         "(B, H, W, Cin), (B, Cin), (3, 3, Cin, Cout), (B, Cout), (Cout,)")
    if noise.shape[-2:] != (h, w) or noise.shape[0] not in (1, b):
        raise ValueError(f"styled_conv3x3: noise {tuple(noise.shape)} is not (1 or {b}, {h}, {w})")
    x = x.contiguous()
    noise = noise.reshape(-1, h, w).contiguous()
    noise_weight = torch.as_tensor(noise_weight, dtype=torch.float32, device=x.device).reshape(1)
    out = torch.empty((b, h, w, cout), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(h * w, block_m), triton.cdiv(cout, block_n), b)
    _styled_conv3x3_kernel[grid](
        x, s.float().contiguous(), weight.to(x.dtype).contiguous(), demod.float().contiguous(), noise,
        bias.float().contiguous(), out, noise_weight, h, w, h * w if noise.shape[0] > 1 else 0,
        CIN=cin, COUT=cout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out


def check_styled_conv_kernel(device: torch.device) -> str | None:
    """The kernel in fp16 against the float32 reference of the same rounded operands on ``device``: None when
    every sample's relative error is within CHECK_REL_BOUND, else what differs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, w, cin, cout = CHECK_SHAPE
    x = torch.randn(b, h, w, cin, generator=gen).half()
    s = 1 + 0.3 * torch.randn(b, cin, generator=gen)
    weight = torch.randn(3, 3, cin, cout, generator=gen).div(math.sqrt(9 * cin)).half().float()
    demod = torch.rsqrt((s[:, :, None] ** 2 * weight.pow(2).sum([0, 1])[None]).sum(1) + 1e-8)
    noise, bias = torch.randn(1, h, w, generator=gen), 0.1 * torch.randn(cout, generator=gen)
    args = [t.to(device) for t in (x, s, weight, demod, noise)]
    out = styled_conv3x3(args[0], args[1], args[2], args[3], args[4], 0.3, bias.to(device)).float().cpu()
    ref = styled_conv3x3_reference(x.float(), s, weight, demod, noise, 0.3, bias)
    err = ((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
    return None if err <= CHECK_REL_BOUND else f"relative error {err:.2e} > {CHECK_REL_BOUND:.0e}"


def use_styled_conv_kernel(device, use_triton: bool | None = None) -> bool:
    """Whether the fused StyledConv kernel serves on ``device`` (kernel_check.use_kernels' rules)."""
    return use_kernels("generator styled conv", device, use_triton, check_styled_conv_kernel)
