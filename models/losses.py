"""E2Style's training losses and the pretrained networks behind them, in plain PyTorch.

Loss (official defaults, E2Style README training command):
    L = 1.0 * L2 + 0.8 * LPIPS(AlexNet) + 0.5 * multi-layer ID + 1.0 * multi-layer parse + 0 * W-norm

- LPIPS: AlexNet ``features`` (torchvision key names, ``features.{0,3,6,8,10}``) with the ``lpips``
  package's linear layers (``lin{0..4}.model.1.weight``), so torchvision's ``alexnet-owt-*.pth`` and lpips'
  ``weights/v0.1/alex.pth`` load as they are.
- Identity: ArcFace IR-SE50 (``Backbone``, TreB1eN/pSp key layout: ``input_layer``, ``body``,
  ``output_layer``) on the 188x188 face crop ``[35:223, 32:220]`` of the 256 image, pooled to 112;
  ``1 - cos`` summed over 5 feature layers (after IR stages 1, 2, 3, 4 and the embedding).
- Parse: the face-parsing U-Net of E2Style's ``criteria/parsing_loss/unet.py`` (CelebAMask-HQ's
  ``unet(feature_scale=4, n_classes=19)``: unetConv2 = 2x[conv3x3 + BN + ReLU], deconv up-path);
  ``1 - cos`` summed over the 5 encoder features (pool1..pool4 and the centre block).
  The up-path does not feed those features, so it is kept for the weights but not run.
- W-norm (pSp): mean over the batch of ||W+ - latent_avg||_2.
- Latent (synthetic data only): MSE between the predicted W+ and the true w.

Pretrained files are read with ``weights_only`` (``models.checkpoint.read_checkpoint``); architecture sizes
(widths, feature scale, classes) are inferred from the weights, so narrow random nets (tests) load the same way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, irse_spec, read_checkpoint
from .encoders import BottleneckIRSE, input_layer, ir_se_blocks

OFFICIAL_WEIGHTS = {"l2": 1.0, "lpips": 0.8, "id": 0.5, "parse": 1.0, "w_norm": 0.0, "latent": 0.0}
# The identity loss's face crop of a 256x256 image (rows 35:223, columns 32:220), pooled to 112.
ID_CROP = (35, 223, 32, 220)
ID_SIZE = 112


# ------------------------------------------------------------------------------------------------
# LPIPS with AlexNet


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


ALEX_TAPS = (1, 4, 7, 9, 11)  # after each ReLU: lpips' slice1..slice5
ALEX_CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018), AlexNet variant. Inputs in [-1, 1]; returns the batch mean."""

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
    sd = _state_dict(read_checkpoint(alexnet_path), alexnet_path)
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    if lin_path is not None:
        lsd = _state_dict(read_checkpoint(lin_path), lin_path)
        lins = {k: v for k, v in lsd.items() if k.startswith("lin")}
        if not lins:
            raise CheckpointError(f"{lin_path}: no lpips linear layers (lin0.model.1.weight ...) in this file")
    if not lins:
        raise CheckpointError(f"{alexnet_path}: no lpips linear layers in this file and no separate lpips_lin file given")
    net = LPIPS()
    _strict_load(net, {**feats, **lins}, alexnet_path if lin_path is None else f"{alexnet_path} + {lin_path}", "LPIPS AlexNet")
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# ArcFace IR-SE50


class Backbone(nn.Module):
    """ArcFace IR-SE (TreB1eN's ``Backbone(112, 50, 'ir_se')``) with the 5 feature taps of E2Style's
    multi-layer identity loss. ``widths`` other than (64, 128, 256, 512) give narrow test nets."""

    def __init__(self, num_layers: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512), embed_dim: int = 512,
                 drop_ratio: float = 0.6, affine: bool = True):
        super().__init__()
        specs = ir_se_blocks(num_layers, widths)
        self.input_layer = input_layer(3, widths[0])
        self.body = nn.Sequential(*[BottleneckIRSE(s.in_channel, s.depth, s.stride) for s in specs])
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(widths[3] * 7 * 7, embed_dim), nn.BatchNorm1d(embed_dim, affine=affine))
        starts = [i for i, s in enumerate(specs) if s.stride == 2][1:]
        self.stage_ends = tuple(starts) + (len(specs),)  # (3, 7, 21, 24) for IR-50

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.input_layer(x)
        feats = []
        begin = 0
        for end in self.stage_ends:
            for unit in self.body[begin:end]:
                x = unit(x)
            feats.append(x.flatten(1))
            begin = end
        feats.append(self.output_layer(x))
        return tuple(feats)


def load_ir_se50(path: str) -> Backbone:
    sd = _state_dict(read_checkpoint(path), path)
    spec = irse_spec(sd, path)
    if "output_layer.3.weight" not in sd:
        raise CheckpointError(f"{path}: an ArcFace IR-SE backbone needs output_layer.* (the embedding head); none in this file")
    net = Backbone(spec["num_layers"], spec["widths"], int(sd["output_layer.3.weight"].shape[0]),
                   affine="output_layer.4.weight" in sd)
    _strict_load(net, sd, path, "ArcFace IR-SE backbone")
    return net.eval().requires_grad_(False)


def irse_encoder_init(encoder: nn.Module, sd: dict[str, torch.Tensor], path: str, include_input_layer: bool = True) -> int:
    """Copy IR-SE50 weights (``input_layer``, ``body``) into an E2Style encoder, as the official code does for
    every new stage (refinement stages skip ``input_layer``: they take 6 channels). Returns tensors copied."""
    own = encoder.state_dict()
    take = {k: v for k, v in sd.items() if k.startswith("body.") or (include_input_layer and k.startswith("input_layer."))}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in take.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: IR-SE weights do not fit the encoder (widths differ?): {', '.join(bad[:4])}")
    take = {k: v for k, v in take.items() if k in own}
    if not take:
        raise CheckpointError(f"{path}: no input_layer/body weights to initialise the encoder from")
    encoder.load_state_dict({k: v.float() for k, v in take.items()}, strict=False)
    return len(take)


# ------------------------------------------------------------------------------------------------
# Face-parsing U-Net


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
    """E2Style's parse-loss U-Net (``unet(feature_scale=4, n_classes=19)``); ``forward`` returns its 5
    encoder features flattened, as the official one does. ``segment`` runs the whole net (class logits)."""

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
    sd = _state_dict(read_checkpoint(path), path)
    if "conv1.conv1.0.weight" not in sd or "final.weight" not in sd:
        raise CheckpointError(f"{path}: not a face-parsing U-Net state dict (no conv1.conv1.0.weight / final.weight)")
    w = sd["conv1.conv1.0.weight"]
    width = int(w.shape[0])
    if 64 % width:
        raise CheckpointError(f"{path}: first U-Net block has {width} channels; expected 64 / feature_scale")
    net = ParsingUNet(64 // width, int(sd["final.weight"].shape[0]), int(w.shape[1]), "conv1.conv1.1.weight" in sd)
    _strict_load(net, sd, path, "face-parsing U-Net")
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Loss modules


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


# ------------------------------------------------------------------------------------------------


def _state_dict(obj: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a file that may wrap it ({'state_dict': ...} / {'model': ...})."""
    for key in ("state_dict", "model", "net"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors in this file")
    return sd


def _strict_load(net: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own) - {k for k in sd if k.startswith("classifier.")})
    shaped = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shaped)) if items]
    if problems:
        raise CheckpointError(f"{path}: does not match the {what}: " + "; ".join(problems))
    net.load_state_dict({k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) for k in own}, strict=True)
