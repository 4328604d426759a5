"""E2Style's training losses, in plain PyTorch (the networks behind them: models/lpips.py, models/arcface.py,
models/face_parsing.py).

Loss (official defaults, E2Style README training command):
    L = 1.0 * L2 + 0.8 * LPIPS(AlexNet) + 0.5 * multi-layer ID + 1.0 * multi-layer parse + 0 * W-norm

- Identity: ArcFace IR-SE50 on the 188x188 face crop ``[35:223, 32:220]`` of the 256 image, pooled to 112;
  ``1 - cos`` summed over 5 feature layers (after IR stages 1, 2, 3, 4 and the embedding).
- Parse: ``1 - cos`` summed over the face-parsing U-Net's 5 encoder features (pool1..pool4, centre block).
- W-norm (pSp): mean over the batch of ||W+ - latent_avg||_2.
- Latent (synthetic data only): MSE between the predicted W+ and the true w.

Each pretrained network is built only when its loss is weighted, and stays frozen (eval mode, no gradients).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .arcface import Backbone, load_ir_se50
from .face_parsing import ParsingUNet, load_parsing_unet
from .lpips import LPIPS, load_lpips

OFFICIAL_WEIGHTS = {"l2": 1.0, "lpips": 0.8, "id": 0.5, "parse": 1.0, "w_norm": 0.0, "latent": 0.0}
# The identity loss's face crop of a 256x256 image (rows 35:223, columns 32:220), pooled to 112.
ID_CROP = (35, 223, 32, 220)
ID_SIZE = 112


def _cos_layers(feats_hat, feats) -> torch.Tensor:
    loss = 0
    for a, b in zip(feats_hat, feats):
        loss = loss + (1 - F.cosine_similarity(a, b.detach(), dim=1)).mean()
    return loss


class IDLoss(nn.Module):
    """Multi-layer identity loss: sum over 5 ArcFace layers of mean(1 - cos)."""

    def __init__(self, facenet: Backbone):
        super().__init__()
        self.facenet = facenet.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the pretrained net stays in eval mode (BN, dropout)
        return super().train(False)

    def extract(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        t, b, l, r = ID_CROP
        x = x[:, :, t * h // 256: b * h // 256, l * w // 256: r * w // 256]
        return self.facenet(F.adaptive_avg_pool2d(x, (ID_SIZE, ID_SIZE)))

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fy = self.extract(y)
        return _cos_layers(self.extract(y_hat), fy)


class ParseLoss(nn.Module):
    """Multi-layer parsing loss: sum over 5 U-Net encoder layers of mean(1 - cos)."""

    def __init__(self, parsenet: ParsingUNet):
        super().__init__()
        self.parsenet = parsenet.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fy = self.parsenet(y)
        return _cos_layers(self.parsenet(y_hat), fy)


class LPIPSLoss(nn.Module):
    def __init__(self, net: LPIPS):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y_hat, y)


def w_norm_loss(codes: torch.Tensor, latent_avg: torch.Tensor | None) -> torch.Tensor:
    """pSp's W-norm: mean over the batch of the L2 norm of the (W+ - latent_avg) codes."""
    if latent_avg is not None:
        codes = codes - latent_avg.to(codes.dtype)
    return codes.flatten(1).norm(2, dim=1).mean()


def latent_loss(codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MSE between predicted codes (B, n, d) or (B, d) and the true w (B, d) or W+ (B, n, d)."""
    if w.ndim == 2 and codes.ndim == 3:
        w = w.unsqueeze(1).expand_as(codes)
    return F.mse_loss(codes, w)


# The config keys of the pretrained files each weighted loss needs.
LOSS_FILES = {"lpips": ("alexnet", "lpips_lin"), "id": ("ir_se50",), "parse": ("parsing",)}


class MissingPretrainedError(FileNotFoundError):
    """A loss with a non-zero weight whose pretrained network file is not configured or not there."""


def check_pretrained(weights: dict[str, float], paths: dict[str, str | None], optional: tuple[str, ...] = ("lpips_lin",)) -> None:
    """Raise MissingPretrainedError, naming the loss, the config key and the path, for any weighted loss
    whose file is missing. Call before building anything."""
    for loss, keys in LOSS_FILES.items():
        if float(weights.get(loss, 0) or 0) <= 0:
            continue
        for key in keys:
            p = paths.get(key)
            if p is None:
                if key in optional:
                    continue
                raise MissingPretrainedError(f"loss.{loss} = {weights[loss]} needs pretrained.{key} (a file path); none is configured "
                                             f"(set loss.{loss}: 0 to train without it)")
            if not os.path.isfile(p):
                raise MissingPretrainedError(f"pretrained.{key}: {p}: no such file (needed by loss.{loss} = {weights[loss]})")


class E2StyleLoss(nn.Module):
    """The weighted sum; builds only the networks whose weight is > 0."""

    def __init__(self, weights: dict[str, float] | None = None, paths: dict[str, str | None] | None = None):
        super().__init__()
        self.weights = {**OFFICIAL_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}
        unknown = sorted(set(self.weights) - set(OFFICIAL_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown loss weights {unknown}; known: {sorted(OFFICIAL_WEIGHTS)}")
        paths = dict(paths or {})
        check_pretrained(self.weights, paths)
        self.lpips = LPIPSLoss(load_lpips(paths["alexnet"], paths.get("lpips_lin"))) if self.weights["lpips"] > 0 else None
        self.id = IDLoss(load_ir_se50(paths["ir_se50"])) if self.weights["id"] > 0 else None
        self.parse = ParseLoss(load_parsing_unet(paths["parsing"])) if self.weights["parse"] > 0 else None

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor, codes: torch.Tensor | None = None,
                latent_avg: torch.Tensor | None = None, w_true: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wt = self.weights
        parts: dict[str, torch.Tensor] = {}
        if wt["l2"] > 0:
            parts["l2"] = F.mse_loss(y_hat, y)
        if self.lpips is not None:
            parts["lpips"] = self.lpips(y_hat, y)
        if self.id is not None:
            parts["id"] = self.id(y_hat, y)
        if self.parse is not None:
            parts["parse"] = self.parse(y_hat, y)
        if wt["w_norm"] > 0 and codes is not None:
            parts["w_norm"] = w_norm_loss(codes, latent_avg)
        if wt["latent"] > 0 and codes is not None and w_true is not None:
            parts["latent"] = latent_loss(codes, w_true)
        total = sum(wt[k] * v for k, v in parts.items()) if parts else y_hat.sum() * 0
        return total, {k: v.detach() for k, v in parts.items()}
