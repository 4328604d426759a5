"""Stage 5, edit: a hook between inversion and writing, filled by a later issue (latent editing).

The hook runs inside the inversion actor, right after ``invert_faces``, with the model at hand so that an
edit can re-synthesise images from edited codes (``model.decode``). Returning ``None`` means "no edit":
the pipeline then writes the inversion as it is and pays nothing for the hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EditResult", "apply_edit"]


@dataclass
class EditResult:
    codes: np.ndarray               # (N, n_latent, 512) float32 edited W+ codes
    images: np.ndarray | None       # (N, 256, 256, 3) uint8 images of the edited codes, or None
    name: str                       # what was applied (written to the stats)


def apply_edit(model: Any, codes: np.ndarray, keys: list[str], options: dict | None = None) -> EditResult | None:
    """No-op for now. ``codes``: (N, n_latent, 512) float32; ``keys``: the rows' keys, same order."""
    return None
