"""Fused Triton kernel for the StyleGAN2 generator's non-upsampling StyledConv (issue 32), and what the generator's
fused kernels share: launch settings, the epilogue, the device check.

At 32-128 channels the 256-1024 px layers are bound by memory traffic: the library convolution writes its output,
then the demodulation, noise, bias and activation read and write it again. Here one kernel does a whole
non-upsampling StyledConv over NHWC activations: the modulated 3x3 convolution as an implicit GEMM over the shared
weight (the input scaled by the styles as it is loaded, fp16/bf16 operands on tensor cores, float32 accumulation),
and in its epilogue the demodulation, the noise, the bias and the leaky ReLU with its gain; the activations are
read once per tap and written once. The upsampling StyledConv is models/stylegan2_upsample_kernel.py.

Reads top-down: the torch reference (the shared form of models/stylegan2.py's StyledConv, in any dtype), the launch
settings (autotuned on CUDA), the kernel and its epilogue, the launcher, the device check. The generator runs it
where asked (Generator.set_fused_styled_convs, off by default); E2Style.optimize_for_gpu first asks
``use_styled_conv_kernel(device, cin, cout, dtype)`` per layer shape and dtype, which runs the check once per
device and process (models/kernel_check.py, the project's one way to trust a kernel group): every launch setting
the autotuner may pick, at every batch size a GPU actor runs. The kernel rounds where the library path does not
(operands to fp16 once, the epilogue in float32), so the check is a tolerance against the float64 reference of
the same rounded operands, not bit equality; across batch sizes each sample's bits must not change.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .kernel_check import tl, triton, use_kernels

LEAKY_SLOPE = 0.2
ACTIVATION_GAIN = math.sqrt(2.0)


def styled_conv3x3_reference(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, demod: torch.Tensor,
                             noise: torch.Tensor, noise_weight: float, bias: torch.Tensor) -> torch.Tensor:
    """NHWC x (B, H, W, Cin), styles s (B, Cin), weight (3, 3, Cin, Cout) (scale included), demodulation (B, Cout),
    noise (B or 1, H, W), bias (Cout,) -> (B, H, W, Cout): StyledConv's shared form in x's dtype."""
    xs = (x * s[:, None, None, :].to(x.dtype)).permute(0, 3, 1, 2)
    out = F.conv2d(xs, weight.permute(3, 2, 0, 1).to(x.dtype), padding=1)
    return epilogue_reference(out.permute(0, 2, 3, 1), demod, noise, noise_weight, bias)


def epilogue_reference(out: torch.Tensor, demod: torch.Tensor, noise: torch.Tensor, noise_weight: float,
                       bias: torch.Tensor) -> torch.Tensor:
    """NHWC convolution output (B, H, W, Cout) -> demodulated, noise, bias, leaky ReLU times its gain."""
    out = out * demod.to(out.dtype)[:, None, None, :] + noise_weight * noise[..., None].to(out.dtype)
    return F.leaky_relu(out + bias.to(out.dtype), LEAKY_SLOPE) * ACTIVATION_GAIN


# -- launch settings ----------------------------------------------------------------------------------------
# (BLOCK_M pixels, BLOCK_N output channels, BLOCK_K input channels, num_warps, num_stages) the autotuner tries on
# CUDA, per (H, W, Cin, Cout, dtype), among those that fit the layer's channels (fitting_settings). Tiles of
# 64-256 pixels by 32-128 channels: the H100's tensor-core shapes for the 32-128 channels of the 256-1024 px layers.
CONV_SETTINGS = [(64, 32, 32, 4, 3), (128, 32, 32, 4, 3), (256, 32, 32, 8, 3), (128, 64, 32, 4, 3),
                 (128, 64, 64, 8, 3), (256, 64, 64, 8, 3), (128, 128, 64, 8, 3)]
AUTOTUNE_KEY = ["H", "W", "CIN", "COUT"]  # triton adds the tensors' dtypes


def _pow2_at_least(n: int, least: int = 32) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _fits(block_n: int, block_k: int, cin: int, cout: int) -> bool:
    """Channel tiles within the layer's channels (rounded up to a power of two, at least 32): a wider tile only
    computes masked zeros."""
    return block_n <= _pow2_at_least(cout) and block_k <= _pow2_at_least(cin)


def fitting_settings(settings: list[tuple], cin: int, cout: int) -> list[tuple]:
    """The settings that fit the layer's channels (_fits); never empty."""
    return [t for t in settings if _fits(t[1], t[2], cin, cout)] or settings[:1]


def interpreter_settings(cin: int, cout: int) -> tuple:
    """Triton's interpreter (CPU tensors) runs a launch's programs one after the other: the largest tiles, fewest
    programs."""
    return (256, min(128, _pow2_at_least(cout, 16)), min(128, _pow2_at_least(cin, 16)), 4, 1)


def triton_configs(settings: list[tuple]) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for m, n, k, w, st in settings]


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """triton.autotune's early_config_prune: fitting_settings on Config objects."""
    args = {**named_args, **kwargs}
    fit = [c for c in configs if _fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], args["CIN"], args["COUT"])]
    return fit or configs[:1]


# -- the kernel ---------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def program_tile(H, W, COUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The program's part of a layer (program axes: pixel blocks, output-channel blocks, images): image b, its
        BLOCK_M pixels offs_m (row-major over H x W: rows h, columns w; m_ok inside the image) and BLOCK_N output
        channels offs_n (n_ok below COUT)."""
        b = tl.program_id(2)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return b, offs_m, offs_m < H * W, offs_m // W, offs_m % W, offs_n, offs_n < COUT

    @triton.jit
    def tap_pixels(h, w, m_ok, H, W, TAP: tl.constexpr):
        """The 3x3 tap TAP (row-major) of pixels (h, w): whether it reads inside the image (zero padding outside),
        and the pixel it reads."""
        hh = h + (TAP // 3 - 1)
        ww = w + (TAP % 3 - 1)
        return m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W), (hh * W + ww).to(tl.int64)

    @triton.jit
    def epilogue_operands(demod_ptr, bias_ptr, noise_weight_ptr, b, offs_n, n_ok, COUT: tl.constexpr):
        """Image b's demodulation and the bias of channels offs_n, and the noise weight (read on the device: no
        host sync, so CUDA graphs can capture the launch)."""
        d = tl.load(demod_ptr + b * COUT + offs_n, mask=n_ok, other=0.0)
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        return d, bias, tl.load(noise_weight_ptr)

    @triton.jit
    def modulated_tile(x_image, s_ptr, b, pixel, inside, kk, k_ok, CIN: tl.constexpr, dtype: tl.constexpr):
        """BLOCK_M pixels x BLOCK_K input channels of one image, scaled by the styles: x * s rounded to x's dtype
        once, as the torch path does."""
        xt = tl.load(x_image + pixel[:, None] * CIN + kk[None, :], mask=inside[:, None] & k_ok[None, :], other=0.0)
        st = tl.load(s_ptr + b * CIN + kk, mask=k_ok, other=0.0)
        return (xt.to(tl.float32) * st[None, :]).to(dtype)

    @triton.jit
    def epilogue_store(acc, d, bias, noise_weight, noise_row, out_row, pixel, m_ok, offs_n, n_ok,
                        COUT: tl.constexpr):
        """In float32: demodulation, noise (one value per pixel), bias, leaky ReLU and its gain; stored NHWC at
        ``pixel`` (output pixel indices of the image whose noise and output start at noise_row, out_row)."""
        nz = tl.load(noise_row + pixel, mask=m_ok, other=0.0).to(tl.float32)
        y = acc * d[None, :] + noise_weight * nz[:, None] + bias[None, :]
        y = tl.where(y >= 0.0, y, y * 0.2) * 1.4142135623730951  # LEAKY_SLOPE, ACTIVATION_GAIN
        out = out_row + pixel.to(tl.int64)[:, None] * COUT + offs_n[None, :]
        tl.store(out, y.to(out_row.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _styled_conv3x3_kernel(x_ptr, s_ptr, w_ptr, demod_ptr, noise_ptr, bias_ptr, out_ptr, noise_weight_ptr,
                               H, W, noise_batch_stride, CIN: tl.constexpr, COUT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               IEEE: tl.constexpr):
        # One program: BLOCK_M pixels of one image (row-major over H x W) by BLOCK_N output channels. The channel
        # counts are compile-time constants (a layer's own; the loop over input channels needs a static bound).
        b, offs_m, m_ok, h, w, offs_n, n_ok = program_tile(H, W, COUT, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_image = x_ptr + b.to(tl.int64) * H * W * CIN
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in tl.static_range(9):
            inside, pixel = tap_pixels(h, w, m_ok, H, W, tap)
            for k0 in range(0, CIN, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < CIN
                xt = modulated_tile(x_image, s_ptr, b, pixel, inside, kk, k_ok, CIN, x_ptr.dtype.element_ty)
                wt = tl.load(w_ptr + (tap * CIN + kk[:, None]) * COUT + offs_n[None, :],
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(xt, wt, input_precision="ieee")
                else:
                    acc += tl.dot(xt, wt)
        d, bias, noise_weight = epilogue_operands(demod_ptr, bias_ptr, noise_weight_ptr, b, offs_n, n_ok, COUT)
        epilogue_store(acc, d, bias, noise_weight, noise_ptr + b * noise_batch_stride,
                        out_ptr + b.to(tl.int64) * H * W * COUT, offs_m, m_ok, offs_n, n_ok, COUT)

    _styled_conv3x3_tuned = triton.autotune(configs=triton_configs(CONV_SETTINGS), key=AUTOTUNE_KEY,
                                            prune_configs_by={"early_config_prune": prune_configs})(
        _styled_conv3x3_kernel)


else:  # CPU-only installs: the launchers refuse (prepare_operands), the torch references serve
    program_tile = tap_pixels = epilogue_operands = modulated_tile = epilogue_store = None


# -- launchers ----------------------------------------------------------------------------------------------

def launch(kernel, tuned, grid_of: Callable, args: list, cin: int, cout: int, x: torch.Tensor,
           settings: tuple | None) -> None:
    """One launch: ``settings`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on the plain kernel; None: the
    autotuned one on CUDA, interpreter_settings on CPU tensors (Triton's interpreter has no timer)."""
    if settings is None and x.device.type != "cuda":
        settings = interpreter_settings(cin, cout)
    ieee = x.dtype == torch.float32
    if settings is None:
        tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, CIN=cin, COUT=cout, IEEE=ieee)
        return
    block_m, block_n, block_k, num_warps, num_stages = settings
    kernel[grid_of(block_m, block_n)](*args, CIN=cin, COUT=cout, BLOCK_M=block_m, BLOCK_N=block_n,
                                      BLOCK_K=block_k, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)


def prepare_operands(name: str, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, weight_shape: tuple,
                     demod: torch.Tensor, noise: torch.Tensor, noise_size: tuple, noise_weight, bias: torch.Tensor):
    """Shapes checked (ValueError naming them), operands as the kernels take them: x contiguous, the weight in x's
    dtype, the styles, demodulation and bias in float32, the noise (B or 1, h, w) and its batch stride, the noise
    strength as a one-element device tensor."""
    if triton is None:
        raise RuntimeError(f"{name} needs the triton package")
    b, cin, cout = x.shape[0], x.shape[-1], weight.shape[-1]
    if (weight.shape != weight_shape or s.shape != (b, cin) or demod.shape != (b, cout) or bias.shape != (cout,)):
        raise ValueError(f"{name}: shapes x {tuple(x.shape)}, s {tuple(s.shape)}, weight {tuple(weight.shape)}, "
                         f"demod {tuple(demod.shape)}, bias {tuple(bias.shape)} do not fit (B, H, W, Cin), (B, Cin), "
                         f"({', '.join(map(str, weight_shape[:-2]))}, Cin, Cout), (B, Cout), (Cout,)")
    pixels = noise_size[0] * noise_size[1]
    if noise.shape[-2:] != noise_size or noise.numel() not in (pixels, b * pixels):
        raise ValueError(f"{name}: noise {tuple(noise.shape)} is not (1 or {b}, {noise_size[0]}, {noise_size[1]})")
    noise = noise.reshape(-1, *noise_size).contiguous()
    stride = noise_size[0] * noise_size[1] if noise.shape[0] > 1 else 0
    noise_weight = torch.as_tensor(noise_weight, dtype=torch.float32, device=x.device).reshape(1)
    return [x.contiguous(), s.float().contiguous(), weight.to(x.dtype).contiguous(), demod.float().contiguous(),
            noise, bias.float().contiguous()], noise_weight, stride


def styled_conv3x3(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, demod: torch.Tensor,
                   noise: torch.Tensor, noise_weight: torch.Tensor | float, bias: torch.Tensor,
                   settings: tuple | None = None) -> torch.Tensor:
    """styled_conv3x3_reference as one Triton kernel (arguments as there; x NHWC in fp16, bf16 or float32, the rest
    in float32; noise_weight a number or a one-element tensor). The output has x's dtype. ``settings``: see launch."""
    b, h, w, cin = x.shape
    cout = weight.shape[-1]
    ops, noise_weight, stride = prepare_operands("styled_conv3x3", x, s, weight, (3, 3, cin, cout), demod, noise,
                                                 (h, w), noise_weight, bias)
    out = torch.empty((b, h, w, cout), device=x.device, dtype=x.dtype)
    args = [*ops, out, noise_weight, h, w, stride]
    grid = lambda bm, bn: (triton.cdiv(h * w, bm), triton.cdiv(cout, bn), b)  # noqa: E731
    launch(_styled_conv3x3_kernel, _styled_conv3x3_tuned, grid, args, cin, cout, ops[0], settings)
    return out


# -- the device check ---------------------------------------------------------------------------------------
# Every batch size a GPU actor may run (pipeline/checkpoints.py's MAX_GPU_BATCH_SIZE: 128), checked on a small
# image: each sample's bits must be the same at every batch size, and those of the largest within the bound.
CHECK_BATCHES = tuple(range(1, 129))
# The checks' image: a multiple of 16 on both sides, as every layer's (Triton specialises integer arguments on it),
# so the code checked is the code the layers run.
CHECK_SIZE = (16, 32)
# Per-sample relative error against float64, per operand dtype (the generator's bounds in check_gpu.py).
BATCHED = ("x", "s", "demod")  # the operands with a batch axis
CHECK_REL_BOUND = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def random_operands(batch: int, h: int, w: int, cin: int, cout: int, dtype: torch.dtype, taps: int = 9,
                    seed: int = 0) -> dict:
    """Float64 CPU operands, rounded to ``dtype`` where the kernel takes them so: x (B, h, w, Cin), styles,
    weight (taps, Cin, Cout), demodulation, noise per sample and shared, bias."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, h, w, cin, generator=gen).to(dtype).double()
    s = (1 + 0.3 * torch.randn(batch, cin, generator=gen)).double()
    weight = torch.randn(taps, cin, cout, generator=gen).div(math.sqrt(9 * cin)).to(dtype).double()
    demod = torch.rsqrt((s[:, :, None] ** 2 * weight.pow(2).sum(0)[None]).sum(1) + 1e-8)
    return {"x": x, "s": s, "weight": weight, "demod": demod, "bias": 0.1 * torch.randn(cout, generator=gen).double(),
            "noise_seed": seed}


def check_fused_kernel(run: Callable, reference: Callable, ops: dict, noise_size: tuple, dtype: torch.dtype,
                       device: torch.device, settings: list, batches=CHECK_BATCHES) -> str | None:
    """``run(ops, noise, settings)`` (device operands; output NHWC) against ``reference(ops, noise)`` (float64):
    None when every sample is within CHECK_REL_BOUND[dtype] with per-sample and shared noise (autotuned launch),
    and, for each of ``settings``, at the largest batch, and at every other batch size of ``batches`` with the
    same bits as the largest's first samples; else what differs."""
    bound, big = CHECK_REL_BOUND[dtype], max(batches)
    gen = torch.Generator(device="cpu").manual_seed(ops["noise_seed"] + 1)
    noises = {"per-sample": torch.randn(big, *noise_size, generator=gen).double(),
              "shared": torch.randn(1, *noise_size, generator=gen).double()}
    dev = {k: v.to(device) for k, v in ops.items() if isinstance(v, torch.Tensor)}
    dev["x"] = dev["x"].to(dtype)

    def error(out, want) -> float:
        diff = (out.double() - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
        return float(diff.max())

    for name, noise in noises.items():
        want = reference(dev, noise.to(device))
        runs = [(None, "autotuned")] + ([(t, str(t)) for t in settings] if name == "shared" else [])
        for setting, label in runs:
            out = run(dev, noise.to(device), setting)
            err = error(out, want)
            if not err <= bound:
                return f"{dtype}, {name} noise, {label}: relative error {err:.2e} > {bound:.0e} at batch {big}"
            if setting is None:
                continue
            for b in batches:
                if b == big:
                    continue
                part = run({**dev, **{k: dev[k][:b] for k in BATCHED}}, noise.to(device), setting)
                if not torch.equal(part, out[:b]):
                    return f"{dtype}, {label}: batch {b} differs from the first {b} samples of batch {big}"
    return None


def check_styled_conv_kernel(device: torch.device, cin: int = 32, cout: int = 32, dtype: torch.dtype = torch.float16,
                             batches=CHECK_BATCHES, settings: list | None = None) -> str | None:
    """The kernel against the float64 reference of the same rounded operands on ``device``, at a layer's channels
    and operand dtype: check_fused_kernel over ``settings`` (default: those the autotuner may pick)."""
    h, w = CHECK_SIZE
    ops = random_operands(max(batches), h, w, cin, cout, dtype)

    def run(d, noise, setting):
        return styled_conv3x3(d["x"], d["s"], d["weight"].reshape(3, 3, cin, cout), d["demod"], noise, 0.3,
                              d["bias"], settings=setting)

    def reference(d, noise):
        return styled_conv3x3_reference(d["x"].double(), d["s"], d["weight"].reshape(3, 3, cin, cout), d["demod"],
                                        noise, 0.3, d["bias"])

    if settings is None:
        settings = fitting_settings(CONV_SETTINGS, cin, cout)
    problem = check_fused_kernel(run, reference, ops, (h, w), dtype, torch.device(device), settings, batches)
    return None if problem is None else f"{cin} -> {cout} channels, {problem}"


def use_styled_conv_kernel(device, cin: int = 32, cout: int = 32, dtype: torch.dtype = torch.float16,
                           use_triton: bool | None = None) -> bool:
    """Whether the fused StyledConv kernel serves a layer of these channels and operand dtype on ``device``
    (kernel_check.use_kernels' rules; checked once per device, shape and dtype)."""
    return use_kernels("generator styled conv", device, use_triton,
                       lambda d: check_styled_conv_kernel(d, cin, cout, dtype), variant=(cin, cout, dtype))
