"""StyleGAN2 generator (Karras et al. 2020) in plain PyTorch.

State-dict compatible with the widely used PyTorch layout (rosinality's stylegan2-pytorch, which the
official E2Style code embeds as its decoder): `style.*`, `input.input`, `conv1.*`, `to_rgb1.*`,
`convs.*`, `to_rgbs.*`, `noises.noise_*` and the FIR `*.kernel` buffers. No CUDA extension: the fused
ops of the original are written out as their reference definitions, so this runs anywhere.

Two formulations of the modulated convolution compute the same function:
- ``"grouped"``: the official one. Per-sample weights (weight * style, demodulated), one grouped
  convolution over the batch. Kept as the float32 reference.
- ``"shared"``: scale the input by the style, convolve the whole batch with the shared weight,
  scale the output by the demodulation coefficients. Mathematically identical (the style multiplies
  input channels, demodulation multiplies output channels), and much faster on GPUs because the
  convolution is one dense, batched kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2_kernels import styled_conv3x3, use_styled_conv_kernel
from .stylegan2_upsample_kernel import styled_upconv3x3, upsample_phase_weights, use_upsample_kernel

MODCONV_MODES = ("grouped", "shared")
# Shared mode's upsampling convolution, all the same function: "transposed" folds the FIR blur into the 3x3
# kernel (one 6x6 transposed convolution: the fastest form on CPUs); "transposed_blur" keeps the official order,
# the transposed 3x3 convolution then the blur as a 16-tap stencil that torch.compile fuses with the epilogue.
# "auto" (the default) is "transposed_blur" on CUDA and "transposed" elsewhere: on an H200 (torch 2.11 + cu130,
# float32) cuDNN returns wrong results for the 6x6 form at batch >= 64, and for a third, dropped, sub-pixel
# form at batch >= 8; the official order is right at every batch size checked. benchmarks/check_gpu.py keeps
# both reproductions and checks every path the code takes on a GPU.
UPSAMPLE_FORMS = ("auto", "transposed", "transposed_blur")
# The RGB skip's 2x upsampling (upfirdn2d, up 2, the 4-tap FIR), all the same function: "auto" is the modulated
# convolutions' mode's (grouped: upfirdn2d; shared: one depthwise transposed convolution); "matmul" is
# U_h @ x @ U_w^T with banded upsampling matrices (cuDNN's depthwise kernel is slow on 3 channels); "phases" writes
# each of the four output phases as a 4-tap stencil of shifted slices, pointwise work that torch.compile fuses
# with ToRGB's bias and sum (the upsampled skip is never stored).
SKIP_UPSAMPLE_FORMS = ("auto", "matmul", "phases")


def make_kernel(k: list[float]) -> torch.Tensor:
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with an FIR kernel, downsample (the reference op)."""
    b, c, h, w = x.shape
    pad0, pad1 = pad
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    x = x[:, :, max(-pad0, 0): x.shape[2] - max(-pad1, 0), max(-pad0, 0): x.shape[3] - max(-pad1, 0)]
    # A true convolution: flip the kernel (a no-op for the symmetric kernels used here).
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    x = F.conv2d(x, weight, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = 2**0.5) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), negative_slope) * scale


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate; `lr_mul` scales the effective learning rate."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.scale, bias)


class Blur(nn.Module):
    def __init__(self, kernel: list[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor**2)
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: list[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * (factor**2))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)
        # The matrix and phase forms need a separable kernel: make_kernel's outer product of a 1-D list.
        self.separable = not isinstance(kernel[0], (list, tuple))

        self.mode = "grouped"
        self.form = "auto"  # one of SKIP_UPSAMPLE_FORMS (E2Style.optimize_for_gpu sets "matmul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.form if self.separable else "auto"
        if form == "matmul":
            return upsample_separable(x, self.kernel, self.factor, self.pad)
        if form == "phases" and self.factor == 2 and self.pad == (2, 1):
            return upsample2x_phases(x, self.kernel)
        if self.mode == "shared" and self.factor == 2 and self.pad == (2, 1):
            # Zero-insertion, pad (2, 1) and a 4-tap FIR is one depthwise transposed convolution
            # (stride 2, padding 1) with the same kernel: no zero-filled intermediate at 2x size.
            c = x.shape[1]
            k = self.kernel.to(x.dtype)  # convT scatters with the kernel as stored, i.e. a true convolution
            return F.conv_transpose2d(x, k[None, None].expand(c, 1, *k.shape), stride=2, padding=1, groups=c)
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)

    def pooled(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        """F.avg_pool2d(self(x), pool) without the upsampled image: both are linear and separable, so their
        composition along each axis is one (factor * n / pool, n) matrix (for the official [1, 3, 3, 1] kernel
        and pool 4: a stride-2 filter [1, 7, 7, 1] / 16)."""
        if not self.separable:
            return F.avg_pool2d(self(x), pool)
        a_h, a_w = separable_factors(self.kernel)
        mh = upsample_pool_matrix(x.shape[-2], a_h, self.factor, self.pad, pool).to(x.dtype)
        mw = upsample_pool_matrix(x.shape[-1], a_w, self.factor, self.pad, pool).to(x.dtype)
        return torch.matmul(torch.matmul(mh, x), mw.t())


def separable_factors(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with outer(a, b) == kernel, for a rank-1 kernel: its row sums, and its column sums over the total."""
    return kernel.sum(1), kernel.sum(0) / kernel.sum()


def upsample_matrix(n: int, kernel_1d: torch.Tensor, factor: int, pad: tuple[int, int]) -> torch.Tensor:
    """(factor * n, n) matrix of upfirdn along one axis: zero insertion, pad, true convolution with the
    1-D kernel. Built from the identity with torch ops (traceable by torch.compile)."""
    eye = torch.eye(n, dtype=kernel_1d.dtype, device=kernel_1d.device)[:, None, :, None]  # n signals (n, 1, n, 1)
    z = F.pad(eye, [0, factor - 1]).reshape(n, 1, n * factor)  # zero insertion
    z = F.pad(z, [pad[0], pad[1]])
    k = torch.flip(kernel_1d, [0])[None, None]
    return F.conv1d(z, k)[:, 0].t()  # column j: the response to input sample j


def upsample_pool_matrix(n: int, kernel_1d: torch.Tensor, factor: int, pad: tuple[int, int], pool: int) -> torch.Tensor:
    """(factor * n / pool, n) matrix: upfirdn along one axis (upsample_matrix), then the mean of each ``pool``
    consecutive samples (average pooling)."""
    u = upsample_matrix(n, kernel_1d, factor, pad)
    return u.reshape(factor * n // pool, pool, n).mean(1)


def upsample_separable(x: torch.Tensor, kernel: torch.Tensor, factor: int, pad: tuple[int, int]) -> torch.Tensor:
    """upfirdn2d(x, kernel, up=factor, pad=pad) for a separable kernel (outer(a, b)), as U_h @ x @ U_w^T."""
    a_h, a_w = separable_factors(kernel)
    uh = upsample_matrix(x.shape[-2], a_h, factor, pad).to(x.dtype)
    uw = upsample_matrix(x.shape[-1], a_w, factor, pad).to(x.dtype)
    return torch.matmul(torch.matmul(uh, x), uw.t())


def upsample2x_phases(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """upfirdn2d(x, kernel, up=2, pad=(2, 1)) for a separable 4x4 kernel, phase by phase: along each axis output
    2m takes taps 0 and 2 of the flipped kernel on inputs m-1, m, output 2m+1 taps 1 and 3 on m, m+1. Slices,
    products and sums only (a compiler fuses them with what consumes the result)."""
    a_h, a_w = separable_factors(kernel)
    a_h, a_w = torch.flip(a_h, [0]).to(x.dtype), torch.flip(a_w, [0]).to(x.dtype)  # a true convolution
    h, w = x.shape[-2:]
    xp = F.pad(x, [1, 1, 1, 1])
    # Rows first: even and odd output rows, each (B, C, H, W + 2).
    rows = [a_h[0] * xp[..., 0:h, :] + a_h[2] * xp[..., 1:h + 1, :],
            a_h[1] * xp[..., 1:h + 1, :] + a_h[3] * xp[..., 2:h + 2, :]]
    phases = [torch.stack([r[..., 0:w] * a_w[0] + r[..., 1:w + 1] * a_w[2],
                           r[..., 1:w + 1] * a_w[1] + r[..., 2:w + 2] * a_w[3]], dim=-1) for r in rows]
    return torch.stack(phases, dim=-3).reshape(*x.shape[:-2], 2 * h, 2 * w)


def fir_stencil(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """upfirdn2d(x, kernel, pad=pad) without up/down-sampling, as a sum of shifted slices (pointwise
    work that compilers fuse; no depthwise convolution kernel)."""
    kh, kw = kernel.shape
    xp = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    h, w = xp.shape[-2] - kh + 1, xp.shape[-1] - kw + 1
    acc = torch.promote_types(x.dtype, torch.float32)
    taps = torch.flip(kernel, [0, 1]).to(acc)  # true convolution, as upfirdn2d
    xp = xp.to(acc)  # accumulate in at least float32 (compiled, this costs nothing: the sum is fused in registers)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            term = xp[:, :, dy:dy + h, dx:dx + w] * taps[dy, dx]
            out = term if out is None else out + term
    return out.to(x.dtype)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True, upsample: bool = False, blur_kernel: list[float] = (1, 3, 3, 1)):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(list(blur_kernel), pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate
        self.mode = "grouped"
        self.upsample_impl = "auto"  # shared mode only: one of UPSAMPLE_FORMS

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)  # (B, in)
        if self.mode == "shared":
            return self._forward_shared(x, s)
        return self._forward_grouped(x, s)

    def _forward_grouped(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        batch, in_ch, height, width = x.shape
        weight = self.scale * self.weight * s.view(batch, 1, in_ch, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        if self.upsample:
            x = x.reshape(1, batch * in_ch, height, width)
            weight = weight.transpose(1, 2).reshape(batch * in_ch, self.out_channel, self.kernel_size, self.kernel_size)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[-2], out.shape[-1])
            return self.blur(out)
        weight = weight.view(batch * self.out_channel, in_ch, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, batch * in_ch, height, width), weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, out.shape[-2], out.shape[-1])

    def upsample_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in, k, k) -> (in, out, k+3, k+3): the conv weight convolved with the blur kernel."""
        o, i, k, _ = weight.shape
        fir = self.blur.kernel.to(weight.dtype)
        full = F.conv2d(F.pad(weight.reshape(o * i, 1, k, k), [3, 3, 3, 3]), torch.flip(fir, [0, 1])[None, None])
        return full.reshape(o, i, k + 3, k + 3).transpose(0, 1)

    def _forward_shared(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * s.to(x.dtype)[:, :, None, None]
        if self.upsample:
            form = self.upsample_impl
            if form == "auto":
                form = "transposed_blur" if x.is_cuda else "transposed"
            if form == "transposed_blur":
                # The official order with the minimum of multiply-adds (2.25 taps per output and input
                # channel): transposed 3x3 conv, then the FIR blur as a 16-tap stencil of shifted slices,
                # which torch.compile fuses with the demodulation and the epilogue into one pass.
                out = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), padding=0, stride=2)
                out = fir_stencil(out, self.blur.kernel, self.blur.pad)
                return self._demodulate(out, weight, s)
            # Transposed conv (3x3, stride 2) then the 4x4 FIR blur is one transposed conv whose 6x6 kernel is
            # the full 2-D convolution of the two: no separate blur pass over the upsampled activations.
            out = F.conv_transpose2d(x, self.upsample_kernel(weight).to(x.dtype), padding=2, stride=2)
        else:
            out = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        return self._demodulate(out, weight, s)

    def _demodulate(self, out: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.demodulate:
            # sum_{i,k} (w_oik * s_bi)^2 = sum_i s_bi^2 * sum_k w_oik^2, in at least float32 even under autocast.
            acc = torch.promote_types(weight.dtype, torch.float32)
            wsq = weight.to(acc).pow(2).sum([2, 3])  # (out, in)
            demod = torch.rsqrt(s.to(acc).pow(2) @ wsq.t() + self.eps)  # (B, out)
            out = out * demod.to(out.dtype)[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            b, _, h, w = image.shape
            noise = image.new_empty(b, 1, h, w).normal_()
        return image + self.weight.to(image.dtype) * noise.to(image.dtype)


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False, blur_kernel: list[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)
        # Operand dtypes for which the whole layer runs as one Triton kernel (Generator.set_fused_styled_convs).
        self.fused_dtypes: frozenset = frozenset()

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype in self.fused_dtypes and self.conv.mode == "shared" and not torch.is_grad_enabled():
            return self._forward_fused(x, style, noise)
        out = self.conv(x, style)
        if self.conv.mode == "shared" and not torch.is_grad_enabled():
            # Inference epilogue in place: noise, bias, leaky ReLU and gain rewrite one buffer instead of
            # allocating four activations at up to 1024x1024 (torch.compile fuses these into one kernel).
            if noise is None:
                noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
            out.addcmul_(noise.to(out.dtype), self.noise.weight.to(out.dtype))
            out.add_(self.activate.bias.to(out.dtype).view(1, -1, 1, 1))
            return F.leaky_relu_(out, 0.2).mul_(2**0.5)
        return self.activate(self.noise(out, noise=noise))

    def fused_kernel_passes(self, device, dtype: torch.dtype) -> bool:
        """Whether this layer's fused kernel passed its device check at its channels and ``dtype``."""
        check = use_upsample_kernel if self.conv.upsample else use_styled_conv_kernel
        return check(device, self.conv.in_channel, self.conv.out_channel, dtype)

    def _forward_fused(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The shared form's inference as one kernel over NHWC activations (models/stylegan2_kernels.py; upsampling:
        models/stylegan2_upsample_kernel.py): the styles, the demodulation and the weights in float32 here, the rest
        in the kernel; the result in x's dtype, channels_last."""
        conv = self.conv
        with torch.autocast(x.device.type, enabled=False):
            s = conv.modulation(style.float())
            weight = conv.scale * conv.weight[0].float()  # (out, in, 3, 3)
            demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + conv.eps)
            if conv.upsample:
                weight = upsample_phase_weights(weight, conv.blur.kernel)
        scale = 2 if conv.upsample else 1
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, scale * x.shape[2], scale * x.shape[3]).normal_()
        fused = styled_upconv3x3 if conv.upsample else styled_conv3x3
        out = fused(x.permute(0, 2, 3, 1), s, weight if conv.upsample else weight.permute(2, 3, 1, 0), demod,
                    noise[:, 0], self.noise.weight, self.activate.bias)
        return out.permute(0, 3, 1, 2)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel: list[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(list(blur_kernel))
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None, pool: int = 1) -> torch.Tensor:
        """pool > 1: F.avg_pool2d of the RGB image by ``pool``, computed at the pooled size. The modulated 1x1
        convolution (no demodulation) and the bias act on each pixel alone, affinely, so they commute with the
        average pooling of ``x``; the skip's upsampling and the pooling fold into one (Upsample.pooled)."""
        if pool > 1:
            x = F.avg_pool2d(x, pool)
        out = self.conv(x, style) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + (self.upsample.pooled(skip, pool) if pool > 1 else self.upsample(skip))
        return out


def default_channels(channel_multiplier: int = 2, width: int = 512) -> dict[int, int]:
    """The official widths per resolution; `width` < 512 scales them down for small test models."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {r: max(1, c * width // 512) for r, c in base.items()}


class Generator(nn.Module):
    """StyleGAN2 generator: mapping network `style`, synthesis from W+ with stored or random noise."""

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channels: dict[int, int] | None = None, blur_kernel: list[float] = (1, 3, 3, 1), lr_mlp: float = 0.01):
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"generator resolution must be a power of two >= 4, got {size}")
        self.size = size
        self.style_dim = style_dim
        self.channels = dict(channels or default_channels())
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)])

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)

        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel

    def set_modconv_mode(self, mode: str) -> None:
        if mode not in MODCONV_MODES:
            raise ValueError(f"modulated convolution mode must be one of {MODCONV_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, (ModulatedConv2d, Upsample)):
                m.mode = mode

    def set_upsample_form(self, form: str) -> None:
        if form not in UPSAMPLE_FORMS:
            raise ValueError(f"upsampling form must be one of {UPSAMPLE_FORMS}, got {form!r}")
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.upsample_impl = form

    def set_fused_styled_convs(self, min_size: int | None, upsample: bool = True,
                               dtypes=(torch.float32, torch.float16, torch.bfloat16), trusted=None) -> None:
        """The StyledConvs at ``min_size`` px and above (the upsampling ones too unless ``upsample`` is False) run as
        one fused Triton kernel each (shared mode, inference) for operands of ``dtypes``, where ``trusted(layer,
        dtype)`` says so (E2Style.optimize_for_gpu passes the device check, StyledConv.fused_kernel_passes; None:
        all); min_size None: none."""
        for k, layer in enumerate(self.convs):
            wanted = min_size is not None and 2 ** (k // 2 + 3) >= min_size and (upsample or not layer.conv.upsample)
            layer.fused_dtypes = frozenset(d for d in dtypes if wanted and (trusted is None or trusted(layer, d)))

    def set_skip_upsample_form(self, form: str) -> None:
        if form not in SKIP_UPSAMPLE_FORMS:
            raise ValueError(f"RGB skip upsampling form must be one of {SKIP_UPSAMPLE_FORMS}, got {form!r}")
        for m in self.modules():
            if isinstance(m, Upsample):
                m.form = form

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Z (B, style_dim) -> W (B, style_dim)."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(n, self.style_dim, generator=gen, device="cpu").to(self.input.input.device)
        return self.mapping(z).mean(0, keepdim=True)

    def stored_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def synthesis(self, wplus: torch.Tensor, randomize_noise: bool = False, truncation: float = 1.0,
                  truncation_latent: torch.Tensor | None = None, pool_to: int | None = None) -> torch.Tensor:
        """W+ (B, n_latent, style_dim), or W (B, style_dim) broadcast to all layers -> image (B, 3, R, R).

        pool_to: the image as F.adaptive_avg_pool2d(image, pool_to) instead (B, 3, pool_to, pool_to). When it
        divides the resolution, the last layer's RGB is made at pool_to directly (ToRGB's ``pool``): the
        full-resolution image never exists."""
        if wplus.ndim == 2:
            wplus = wplus.unsqueeze(1).repeat(1, self.n_latent, 1)
        if wplus.shape[1] != self.n_latent:
            raise ValueError(f"expected {self.n_latent} W+ codes, got {wplus.shape[1]}")
        if truncation < 1.0:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (the average W)")
            truncation_latent = truncation_latent.reshape(1, -1, self.style_dim)
            wplus = truncation_latent + truncation * (wplus - truncation_latent)
        noise = [None] * self.num_layers if randomize_noise else self.stored_noise()

        out = self.input(wplus.shape[0]).to(wplus.dtype)
        out = self.conv1(out, wplus[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, wplus[:, 1])
        i = 1
        last = len(self.to_rgbs) - 1
        pool = self.size // pool_to if pool_to is not None and pool_to < self.size and self.size % pool_to == 0 else 1
        for layer, (conv_up, conv, noise1, noise2, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs)):
            out = conv_up(out, wplus[:, i], noise=noise1)
            out = conv(out, wplus[:, i + 1], noise=noise2)
            skip = to_rgb(out, wplus[:, i + 2], skip, pool=pool if layer == last else 1)
            i += 2
        if pool_to is not None and skip.shape[-2:] != (pool_to, pool_to):
            skip = F.adaptive_avg_pool2d(skip, (pool_to, pool_to))
        return skip

    def forward(self, z: torch.Tensor, randomize_noise: bool = False, truncation: float = 1.0, truncation_latent: torch.Tensor | None = None) -> torch.Tensor:
        return self.synthesis(self.mapping(z), randomize_noise, truncation, truncation_latent)


def generator_config_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Infer size, style_dim, n_mlp and per-resolution channels from the weights alone."""
    try:
        style_dim = sd[f"{prefix}style.1.weight"].shape[1]
        n_mlp = sum(1 for k in sd if k.startswith(f"{prefix}style.") and k.endswith(".weight"))
        n_convs = sum(1 for k in sd if k.startswith(f"{prefix}convs.") and k.endswith(".conv.weight"))
        channels = {4: sd[f"{prefix}input.input"].shape[1]}
    except KeyError as e:
        raise KeyError(f"not a StyleGAN2 generator state_dict: missing {e.args[0]!r}") from None
    size = 4 * 2 ** (n_convs // 2)
    for i in range(n_convs // 2):
        channels[8 * 2**i] = sd[f"{prefix}convs.{2 * i}.conv.weight"].shape[1]
    return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channels": channels}
