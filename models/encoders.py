"""The IR-SE50 backbone and the E2Style encoders built on it.

Module and parameter names follow the official E2Style code (`input_layer`, `body.N.res_layer.*`,
`body.N.shortcut_layer.*`, `output_layer_{3,4,5}`), so official checkpoints load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# First-stage heads: (head name, channels of the features it reads, number of W+ codes it emits).
# The official order of the codes is deep (coarse) head first, shallow (fine) head last.
HEAD_NAMES = ("output_layer_3", "output_layer_4", "output_layer_5")
# Bottleneck units after which each head reads the features: deep head after unit 21 (index 20),
# the 128-channel head after unit 7, the 64-channel head after unit 3.
HEAD_TAPS = {"output_layer_3": 21, "output_layer_4": 7, "output_layer_5": 3}
UNITS_USED = 21


@dataclass(frozen=True)
class BottleneckSpec:
    in_channel: int
    depth: int
    stride: int


def ir_se_blocks(num_layers: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> list[BottleneckSpec]:
    """Unit specs of IR-SE-50/100/152: four stages, the first unit of each stage strides by 2."""
    units = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}[num_layers]
    specs = []
    in_ch = widths[0]
    for depth, n in zip(widths, units):
        specs.append(BottleneckSpec(in_ch, depth, 2))
        specs.extend(BottleneckSpec(depth, depth, 1) for _ in range(n - 1))
        in_ch = depth
    return specs


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class Subsample(nn.Module):
    """The identity shortcut of a strided unit. Official code writes it as MaxPool2d(1, stride), which
    is the same function: a 1x1 max-pool only picks every stride-th pixel. Slicing skips the pool kernel."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ChannelPaddedConv2d(nn.Conv2d):
    """A Conv2d whose input channels are zero-padded to a multiple of ``multiple`` (input and weight alike:
    the same result). cuDNN's tensor-core kernels want 8-channel multiples; for the 3- and 6-channel encoder
    inputs it falls back to slow ones. An inference-time swap (the state dict's weight shape changes)."""

    def __init__(self, conv: nn.Conv2d, multiple: int = 8):
        extra = (-conv.in_channels) % multiple
        super().__init__(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.extra = extra
        with torch.no_grad():
            self.weight.copy_(F.pad(conv.weight, [0, 0, 0, 0, 0, extra]))
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [0, 0, 0, 0, 0, self.extra]))


def pad_input_channels(encoder: nn.Module, multiple: int = 8) -> None:
    """Swap the encoder's first convolution for a ChannelPaddedConv2d when its input channels need it."""
    conv = encoder.input_layer[0]
    if isinstance(conv, nn.Conv2d) and not isinstance(conv, ChannelPaddedConv2d) and conv.in_channels % multiple:
        encoder.input_layer[0] = ChannelPaddedConv2d(conv, multiple)


def input_layer(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, width, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))


def code_head(channels: int, n_codes: int, style_dim: int = 512) -> nn.Sequential:
    """BatchNorm, pool to 7x7, flatten, one linear layer to `n_codes` W+ codes."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(channels * 49, style_dim * n_codes))


class E2StyleEncoder(nn.Module):
    """E2Style encoder: IR-SE50 cut after its 21st unit, with three heads at three depths.

    The same class serves the first stage (input: the image) and the refinement stages (input: the
    image concatenated with the previous stage's 256px reconstruction, so `in_channels` = input_nc + 3).
    The full 24-unit body is kept because official checkpoints store it; units 22-24 are never run.
    """

    def __init__(self, in_channels: int = 3, head_codes: tuple[int, int, int] = (9, 5, 4), widths: tuple[int, int, int, int] = (64, 128, 256, 512), num_layers: int = 50, style_dim: int = 512):
        super().__init__()
        self.head_codes = tuple(head_codes)
        self.style_dim = style_dim
        self.input_layer = input_layer(in_channels, widths[0])
        self.body = nn.Sequential(*[BottleneckIRSE(s.in_channel, s.depth, s.stride) for s in ir_se_blocks(num_layers, widths)])
        specs = ir_se_blocks(num_layers, widths)
        for name, n_codes in zip(HEAD_NAMES, head_codes):
            setattr(self, name, code_head(specs[HEAD_TAPS[name] - 1].depth, n_codes, style_dim))

    @property
    def n_codes(self) -> int:
        return sum(self.head_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        taps = {}
        for i, unit in enumerate(self.body[:UNITS_USED], start=1):
            x = unit(x)
            for name, tap in HEAD_TAPS.items():
                if tap == i:
                    taps[name] = x
        codes = [getattr(self, name)(taps[name]).view(-1, n, self.style_dim) for name, n in zip(HEAD_NAMES, self.head_codes)]
        return torch.cat(codes, dim=1)


class WEncoder(nn.Module):
    """The `learn_in_w` variant (pSp's BackboneEncoderUsingLastLayerIntoW): the whole IR-SE50 body,
    global pooling and one linear layer to a single W code that the generator broadcasts to all layers."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int, int] = (64, 128, 256, 512), num_layers: int = 50, style_dim: int = 512):
        super().__init__()
        self.style_dim = style_dim
        self.input_layer = input_layer(in_channels, widths[0])
        self.body = nn.Sequential(*[BottleneckIRSE(s.in_channel, s.depth, s.stride) for s in ir_se_blocks(num_layers, widths)])
        self.output_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(widths[3], style_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_pool(self.body(self.input_layer(x)))
        return self.linear(x.flatten(1))
