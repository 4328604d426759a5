"""The multi-stage E2Style model: a first-stage encoder, refinement encoders, a frozen StyleGAN2 decoder.

Stage 1: codes = E1(x) (+ latent_avg). Stage k > 1: codes += E_k(concat(x, pool256(G(codes_{k-1})))).
Each stage's reconstruction is the generator output average-pooled to 256x256 (the official `face_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import E2StyleEncoder, WEncoder
from .stylegan2 import Generator

POOLED_SIZE = 256
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InversionOutput:
    codes: torch.Tensor  # (B, n_latent, style_dim), W+ after the last stage run, average latent included
    images: torch.Tensor | None  # (B, 3, 256, 256), that stage's reconstruction; None in latents-only mode


def face_pool(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images, (POOLED_SIZE, POOLED_SIZE))


class E2Style(nn.Module):
    def __init__(self, encoder_firststage: nn.Module, encoder_refinestage_list: list[nn.Module], decoder: Generator, latent_avg: torch.Tensor | None, start_from_latent_avg: bool = True, learn_in_w: bool = False, input_nc: int = 3, label_nc: int = 0):
        super().__init__()
        self.encoder_firststage = encoder_firststage
        self.encoder_refinestage_list = nn.ModuleList(encoder_refinestage_list)
        self.decoder = decoder
        # Official checkpoints keep latent_avg beside the state_dict, not in it: not persistent here either.
        self.register_buffer("latent_avg", latent_avg if latent_avg is not None else torch.zeros(decoder.style_dim), persistent=False)
        self.start_from_latent_avg = start_from_latent_avg
        self.learn_in_w = learn_in_w
        self.input_nc = input_nc
        self.label_nc = label_nc
        self.precision = "fp32"

    @property
    def num_stages(self) -> int:
        return 1 + len(self.encoder_refinestage_list)

    @property
    def n_latent(self) -> int:
        return self.decoder.n_latent

    @property
    def resolution(self) -> int:
        return self.decoder.size

    def set_precision(self, precision: str) -> None:
        """fp32 keeps the official grouped modulated convolution (the reference); bf16/fp16 switch to the
        shared-weight form under autocast, which is the fast path on GPUs."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.decoder.set_modconv_mode("grouped" if precision == "fp32" else "shared")

    def _encode_first(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encoder_firststage(x)
        if self.start_from_latent_avg:
            codes = codes + self.latent_avg.reshape((1,) * (codes.ndim - self.latent_avg.ndim) + tuple(self.latent_avg.shape)).to(codes.dtype)
        return codes

    def _wplus(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.unsqueeze(1).expand(-1, self.n_latent, -1) if codes.ndim == 2 else codes

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """W+ codes -> 256x256 images with the stored noise (the official inference setting)."""
        with torch.no_grad(), self._autocast(codes.device):
            return face_pool(self.decoder.synthesis(self._wplus(codes))).float()

    @torch.no_grad()
    def invert(self, x: torch.Tensor, stages: int | None = None, return_images: bool = True) -> InversionOutput:
        """x: (B, input_nc, 256, 256) in [-1, 1]. Runs stages 1..k; images are stage k's reconstruction."""
        stages = self.num_stages if stages is None else int(stages)
        if not 1 <= stages <= self.num_stages:
            raise ValueError(f"stages must be in 1..{self.num_stages} for this checkpoint, got {stages}")
        if x.ndim != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"expected input of shape (B, {self.input_nc}, H, W), got {tuple(x.shape)}")
        with self._autocast(x.device):
            codes = self._encode_first(x)
            images = None
            for k in range(1, stages):
                images = face_pool(self.decoder.synthesis(self._wplus(codes)))
                refine_in = torch.cat((x.to(images.dtype), images), dim=1)
                codes = codes + self.encoder_refinestage_list[k - 1](refine_in).to(codes.dtype)
            images = face_pool(self.decoder.synthesis(self._wplus(codes))) if return_images else None
        codes = self._wplus(codes).float()
        return InversionOutput(codes=codes, images=images.float() if images is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.invert(x).images


def build_encoder(in_channels: int, head_codes: tuple[int, ...] | None, widths: tuple[int, int, int, int], num_layers: int, style_dim: int) -> nn.Module:
    if head_codes is None:
        return WEncoder(in_channels, widths, num_layers, style_dim)
    return E2StyleEncoder(in_channels, head_codes, widths, num_layers, style_dim)
