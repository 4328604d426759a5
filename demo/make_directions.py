"""The demo's editing direction, derived exactly from the demo generator (demo/generator.pt): ``brightness``.

The demo generator makes colour fields, not faces, so a face attribute (age, smile) means nothing to it; the
mean brightness of its images does. As InterFaceGAN finds an attribute's direction as the normal of a linear
boundary in W, this fits the attribute linearly in W: N latents w = mapping(z) (z ~ N(0, I), seed 0), their
images G(w) (w on every layer), each image's mean luma (ITU-R BT.601 weights, the image in [-1, 1]), and the
least-squares slope of luma on w (both centred), scaled to unit length. Moving a code by +alpha along it makes
its image brighter, -alpha darker (tests/test_readme.py checks that on the demo's own reconstructions).

    .venv/bin/python demo/make_directions.py            # writes demo/directions/brightness.npy
    .venv/bin/python demo/make_directions.py --check    # recomputes and compares with the shipped file
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from models.checkpoint import load_stylegan2

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATOR = os.path.join(HERE, "generator.pt")
BRIGHTNESS = os.path.join(HERE, "directions", "brightness.npy")
SAMPLES = 512
SEED = 0
BATCH = 256
LUMA = (0.299, 0.587, 0.114)
# Float32 sums in another order (another machine's BLAS) move the slope by far less than this.
CHECK_TOLERANCE = 1e-4


@torch.no_grad()
def latents_and_brightness(generator_path: str = GENERATOR, samples: int = SAMPLES, seed: int = SEED
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(w (N, style_dim), mean luma of G(w) (N,)) for N latents sampled with ``seed``."""
    G = load_stylegan2(generator_path)
    z = torch.randn(samples, G.style_dim, generator=torch.Generator().manual_seed(seed))
    w = G.mapping(z)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    bright = torch.cat([(G.synthesis(w[i:i + BATCH]) * luma).sum(1).mean((1, 2)) for i in range(0, samples, BATCH)])
    return w.double().numpy(), bright.double().numpy()


def brightness_direction(w: np.ndarray, bright: np.ndarray) -> np.ndarray:
    """The unit-length least-squares slope of brightness on w (float32, shape (style_dim,))."""
    slope, *_ = np.linalg.lstsq(w - w.mean(0), bright - bright.mean(), rcond=None)
    return (slope / np.linalg.norm(slope)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args(argv)
    w, bright = latents_and_brightness()
    direction = brightness_direction(w, bright)
    proj = (w - w.mean(0)) @ direction
    corr = float(np.corrcoef(proj, bright)[0, 1])
    per_alpha = float(np.polyfit(proj, bright, 1)[0])
    print(f"brightness direction: spread of w along it (std) {proj.std():.3f}; correlation with brightness "
          f"{corr:.3f}; brightness {per_alpha:+.3f} per unit alpha (images in [-1, 1]; brightness std {bright.std():.3f})")
    if args.check:
        shipped = np.load(BRIGHTNESS)
        diff = float(np.abs(shipped - direction).max())
        print(f"largest difference from {BRIGHTNESS}: {diff:.2e}")
        return 0 if diff <= CHECK_TOLERANCE else 1
    os.makedirs(os.path.dirname(BRIGHTNESS), exist_ok=True)
    np.save(BRIGHTNESS, direction)
    print(f"wrote {BRIGHTNESS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
