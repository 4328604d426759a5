"""Regenerates the official-layout checkpoints described by tests/data/official/manifest.json (README.md there:
the fill rule, and what the float64 reference outputs beside it hold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers.paths import DATA_DIR

FIXTURE_DIR = Path(DATA_DIR) / "official"


def _fill(entries: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for e in entries:
        shape = tuple(e["shape"])
        if e["fill"] == "normal":
            value = e["mean"] + e["std"] * rng.standard_normal(int(np.prod(shape)))
            out[e["name"]] = torch.from_numpy(value.astype(np.float32).reshape(shape))
        elif e["fill"] == "const":
            out[e["name"]] = torch.full(shape, e["value"], dtype=torch.int64)
        elif e["fill"] == "exact":
            out[e["name"]] = torch.tensor(np.asarray(e["values"], dtype=np.float32).reshape(shape))
        else:
            raise ValueError(f"unknown fill rule {e['fill']!r} for {e['name']}")
    return out


def manifest() -> dict:
    return json.loads((FIXTURE_DIR / "manifest.json").read_text())


def official_e2style_checkpoint(m: dict | None = None) -> dict:
    e = (m or manifest())["e2style"]
    rng = np.random.default_rng(e["seed"])
    state_dict = _fill(e["entries"], rng)
    latent_avg = _fill([e["latent_avg"]], rng)["latent_avg"]
    return {"state_dict": state_dict, "latent_avg": latent_avg, "opts": dict(e["checkpoint_layout"]["opts"])}


def official_generator_checkpoint(m: dict | None = None) -> dict:
    g = (m or manifest())["generator"]
    g_ema = _fill(g["entries"], np.random.default_rng(g["seed"]))
    return {"g_ema": g_ema, "latent_avg": torch.zeros(g["style_dim"])}
