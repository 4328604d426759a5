"""LPIPS v0.1 (Zhang et al. 2018), AlexNet variant, in plain PyTorch.

AlexNet ``features`` with torchvision's key names (``features.{0,3,6,8,10}``) and the ``lpips`` package's
linear layers (``lin{0..4}.model.1.weight``), so torchvision's ``alexnet-owt-*.pth`` and lpips'
``weights/v0.1/alex.pth`` load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError, read_checkpoint
from .pretrained import load_strict, plain_state_dict

ALEX_TAPS = (1, 4, 7, 9, 11)  # after each ReLU: lpips' slice1..slice5
ALEX_CHANNELS = (64, 192, 384, 256, 256)


class LinLayer(nn.Module):
    """lpips' NetLinLayer: Dropout then a bias-free 1x1 conv; its weight is ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, 1, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` (same indices, so ``features.N.*`` keys load)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


class LPIPS(nn.Module):
    """LPIPS with AlexNet. Inputs in [-1, 1]; ``forward`` returns the batch mean, ``per_sample`` one value each."""

    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        for i, c in enumerate(ALEX_CHANNELS):
            setattr(self, f"lin{i}", LinLayer(c))
        # lpips' ScalingLayer (not in its state dict either).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[: ALEX_TAPS[-1] + 1]):
            x = layer(x)
            if i in ALEX_TAPS:
                out.append(x)
        return out

    @staticmethod
    def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

    def per_sample(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self._feats(x), self._feats(y)
        d = 0
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (self._unit(a) - self._unit(b)).pow(2)
            d = d + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3))
        return d.view(-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample(x, y).mean()


def load_lpips(alexnet_path: str, lin_path: str | None = None) -> LPIPS:
    """AlexNet features from ``alexnet_path`` (a torchvision alexnet state dict; ``classifier.*`` ignored)
    and the linear layers from ``lin_path`` (lpips' ``alex.pth``); one file holding both also works."""
    sd = plain_state_dict(read_checkpoint(alexnet_path), alexnet_path)
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    if lin_path is not None:
        lsd = plain_state_dict(read_checkpoint(lin_path), lin_path)
        lins = {k: v for k, v in lsd.items() if k.startswith("lin")}
        if not lins:
            raise CheckpointError(f"{lin_path}: no lpips linear layers (lin0.model.1.weight ...) in this file")
    if not lins:
        raise CheckpointError(f"{alexnet_path}: no lpips linear layers in this file and no separate lpips_lin file given")
    net = LPIPS()
    load_strict(net, {**feats, **lins}, alexnet_path if lin_path is None else f"{alexnet_path} + {lin_path}", "LPIPS AlexNet")
    return net.eval().requires_grad_(False)
