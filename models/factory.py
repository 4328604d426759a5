"""Small random-init E2Style checkpoints in the official layout, for tests, demos and benchmarks.

    python -m models.factory --out small.pt --resolution 64 --stages 2 --seed 0 [--width 64]
    python -m models.factory --out g.pt --generator-only --resolution 64

`--width` scales the generator's channels (512 = official); the encoder's IR-SE widths scale with it
(64 at width 512, the official (64, 128, 256, 512); never below 16, where the SE gates' 1/16 reduction
still leaves one channel). `--full` builds the official-size architecture (1024px, IR-SE50 at full width).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

import torch

from .checkpoint import save_safetensors
from .e2style import E2Style, build_encoder
from .stylegan2 import Generator, default_channels

OFFICIAL_OPTS = {"input_nc": 3, "label_nc": 0, "start_from_latent_avg": True, "learn_in_w": False, "dataset_type": "ffhq_encode"}


def split_head_codes(n_latent: int) -> tuple[int, int, int]:
    """The official 9/5/4 split of 18 codes (coarse, middle, fine), scaled to other n_latent."""
    if n_latent == 18:
        return (9, 5, 4)
    fine = max(1, round(n_latent * 4 / 18))
    middle = max(1, round(n_latent * 5 / 18))
    return (n_latent - middle - fine, middle, fine)


def encoder_widths(width: int) -> tuple[int, int, int, int]:
    base = max(16, 64 * width // 512)
    return (base, base * 2, base * 4, base * 8)


def build_e2style(resolution: int = 64, stages: int = 2, width: int = 64, seed: int = 0, input_nc: int = 3, learn_in_w: bool = False, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2) -> E2Style:
    """A randomly initialised E2Style whose weights have sane scales (BatchNorm stats at identity)."""
    torch.manual_seed(seed)
    G = Generator(resolution, style_dim, n_mlp, channels=default_channels(channel_multiplier, width))
    widths = encoder_widths(width)
    head_codes = None if learn_in_w else split_head_codes(G.n_latent)
    first = build_encoder(input_nc, head_codes, widths, 50, style_dim)
    refines = [build_encoder(input_nc + 3, head_codes, widths, 50, style_dim) for _ in range(stages - 1)]
    for enc in [first, *refines]:
        # Small head weights keep random codes near latent_avg, where the generator's output is tame.
        for m in enc.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02 / math.sqrt(m.in_features))
                torch.nn.init.zeros_(m.bias)
    with torch.no_grad():
        latent_avg = G.mean_latent(1024, seed=seed)
    latent_avg = latent_avg.reshape(style_dim) if learn_in_w else latent_avg.repeat(G.n_latent, 1)
    model = E2Style(first, refines, G, latent_avg, True, learn_in_w, input_nc, 0)
    return model.eval()


def e2style_checkpoint(model: E2Style, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The official file layout: {'state_dict', 'latent_avg', 'opts'}."""
    o = dict(OFFICIAL_OPTS, input_nc=model.input_nc, learn_in_w=model.learn_in_w, training_stage=model.num_stages)
    o.update(opts or {})
    return {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "latent_avg": model.latent_avg.detach().clone(), "opts": o}


def generator_checkpoint(G: Generator, latent_avg: torch.Tensor | None = None) -> dict[str, Any]:
    if latent_avg is None:
        latent_avg = G.mean_latent(1024)
    return {"g_ema": {k: v.detach().clone() for k, v in G.state_dict().items()}, "latent_avg": latent_avg.reshape(-1).detach().clone()}


def atomic_save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        if path.endswith(".safetensors"):
            save_safetensors(obj, tmp)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checkpoint(path: str | os.PathLike, resolution: int = 64, stages: int = 2, seed: int = 0, width: int = 64, input_nc: int = 3, learn_in_w: bool = False, opts: dict[str, Any] | None = None) -> str:
    model = build_e2style(resolution, stages, width, seed, input_nc, learn_in_w)
    atomic_save(e2style_checkpoint(model, opts), path)
    return os.fspath(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.factory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path (.pt, or .safetensors)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64, help="generator width knob (512 = official)")
    p.add_argument("--input-nc", type=int, default=3)
    p.add_argument("--learn-in-w", action="store_true")
    p.add_argument("--full", action="store_true", help="official size: 1024px, width 512")
    p.add_argument("--generator-only", action="store_true", help="write {'g_ema', 'latent_avg'} instead")
    a = p.parse_args(argv)
    resolution, width = (1024, 512) if a.full else (a.resolution, a.width)
    if a.generator_only:
        torch.manual_seed(a.seed)
        G = Generator(resolution, channels=default_channels(2, width))
        atomic_save(generator_checkpoint(G), a.out)
    else:
        write_checkpoint(a.out, resolution, a.stages, a.seed, width, a.input_nc, a.learn_in_w)
    print(a.out)


if __name__ == "__main__":
    main()
