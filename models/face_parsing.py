"""The face-parsing U-Net of E2Style's ``criteria/parsing_loss/unet.py`` (CelebAMask-HQ's
``unet(feature_scale=4, n_classes=19)``: unetConv2 = 2x[conv3x3 + BN + ReLU], deconv up-path), the network
behind the multi-layer parse loss. Its feature scale, classes and input channels are inferred from the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, read_checkpoint
from .pretrained import load_strict, plain_state_dict


class UnetConv2(nn.Module):
    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True):
        super().__init__()
        if is_batchnorm:
            self.conv1 = nn.Sequential(nn.Conv2d(in_size, out_size, 3, 1, 1), nn.BatchNorm2d(out_size), nn.ReLU())
            self.conv2 = nn.Sequential(nn.Conv2d(out_size, out_size, 3, 1, 1), nn.BatchNorm2d(out_size), nn.ReLU())
        else:
            self.conv1 = nn.Sequential(nn.Conv2d(in_size, out_size, 3, 1, 1), nn.ReLU())
            self.conv2 = nn.Sequential(nn.Conv2d(out_size, out_size, 3, 1, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UnetUp(nn.Module):
    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True):
        super().__init__()
        self.conv = UnetConv2(in_size, out_size, is_batchnorm)
        self.up = nn.ConvTranspose2d(in_size, out_size, kernel_size=2, stride=2)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        off = x.shape[2] - skip.shape[2]
        skip = F.pad(skip, 2 * [off // 2, off // 2])
        return self.conv(torch.cat([skip, x], 1))


class ParsingUNet(nn.Module):
    """E2Style's parse-loss U-Net; ``forward`` returns its 5 encoder features (pool1..pool4 and the centre
    block) flattened, as the official one does: the up-path does not feed them, so the loss never runs it.
    ``segment`` runs the whole net (class logits)."""

    def __init__(self, feature_scale: int = 4, n_classes: int = 19, in_channels: int = 3, is_batchnorm: bool = True):
        super().__init__()
        f = [int(c / feature_scale) for c in (64, 128, 256, 512, 1024)]
        self.conv1 = UnetConv2(in_channels, f[0], is_batchnorm)
        self.conv2 = UnetConv2(f[0], f[1], is_batchnorm)
        self.conv3 = UnetConv2(f[1], f[2], is_batchnorm)
        self.conv4 = UnetConv2(f[2], f[3], is_batchnorm)
        self.center = UnetConv2(f[3], f[4], is_batchnorm)
        self.up_concat4 = UnetUp(f[4], f[3], is_batchnorm)
        self.up_concat3 = UnetUp(f[3], f[2], is_batchnorm)
        self.up_concat2 = UnetUp(f[2], f[1], is_batchnorm)
        self.up_concat1 = UnetUp(f[1], f[0], is_batchnorm)
        self.final = nn.Conv2d(f[0], n_classes, 1)

    def _down(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            c = conv(x)
            outs.append(c)
            x = F.max_pool2d(c, 2)
            outs.append(x)
        outs.append(self.center(x))
        return outs  # conv1, pool1, conv2, pool2, conv3, pool3, conv4, pool4, center

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self._down(x)
        return tuple(t.flatten(1) for t in (d[1], d[3], d[5], d[7], d[8]))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        c1, _, c2, _, c3, _, c4, _, center = self._down(x)
        up = self.up_concat4(c4, center)
        up = self.up_concat3(c3, up)
        up = self.up_concat2(c2, up)
        up = self.up_concat1(c1, up)
        return self.final(up)


def load_parsing_unet(path: str) -> ParsingUNet:
    sd = plain_state_dict(read_checkpoint(path), path)
    if "conv1.conv1.0.weight" not in sd or "final.weight" not in sd:
        raise CheckpointError(f"{path}: not a face-parsing U-Net state dict (no conv1.conv1.0.weight / final.weight)")
    w = sd["conv1.conv1.0.weight"]
    width = int(w.shape[0])
    if 64 % width:
        raise CheckpointError(f"{path}: first U-Net block has {width} channels; expected 64 / feature_scale")
    net = ParsingUNet(64 // width, int(sd["final.weight"].shape[0]), int(w.shape[1]), "conv1.conv1.1.weight" in sd)
    load_strict(net, sd, path, "face-parsing U-Net")
    return net.eval().requires_grad_(False)
