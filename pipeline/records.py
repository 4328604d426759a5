"""The records that travel between stages (and between Ray processes): plain dataclasses, no behaviour
beyond slicing. Every stage may import this module; it imports none."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Row", "PreparedChunk", "EditVariant", "EditResult", "InvertResult", "ALIGN_PENDING"]

# Status of an input row whose photo the inversion actor still has to align (align.backend: torch); the
# actor's result replaces it by the photo's rows, so it is never written.
ALIGN_PENDING = "align_pending"


@dataclass
class Row:
    """One output row: one input, or one face of it with ``align.policy: all``."""
    key: str
    source: str
    face_index: int = 0
    status: str = "ok"
    error: str | None = None
    quad: list[float] | None = None        # 8 floats: (4, 2) corners in source pixels
    landmarks: list[float] | None = None   # 136 floats: (68, 2) in source pixels
    score: float | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class PreparedChunk:
    """Up to ``ray.chunk_size`` inputs of a shard after read -> decode -> align: what goes to inversion."""
    shard: str
    index: int
    rows: list[Row]
    faces: np.ndarray            # (F, S, S, 3) uint8, one per row with status "ok", in row order
    timings: dict[str, float]    # seconds per stage spent on this chunk
    n_inputs: int
    originals: list[bytes] | None = None  # output.paste_back: the input's bytes per face (shared per input),
                                          # or per photo when the actor aligns
    photos: list[np.ndarray] | None = None  # align.backend torch: decoded HxWx3 uint8 photos, one per
                                            # ALIGN_PENDING row in row order; faces is then empty

    @property
    def n_faces(self) -> int:
        return int(len(self.faces))

    @property
    def n_photos(self) -> int:
        return 0 if self.photos is None else len(self.photos)


@dataclass
class EditVariant:
    tag: str                         # edit_<name>_<alpha>
    codes: np.ndarray                # (N, n_latent, D) float32
    images: np.ndarray | None        # (N, 256, 256, 3) uint8, or None (latents-only runs)


@dataclass
class EditResult:
    variants: list[EditVariant] = field(default_factory=list)
    save_codes: bool = False
    seconds: float = 0.0

    def slice(self, s: slice) -> "EditResult":
        return EditResult([EditVariant(v.tag, v.codes[s], None if v.images is None else v.images[s])
                           for v in self.variants], self.save_codes, self.seconds)


@dataclass
class InvertResult:
    codes: np.ndarray       # (N, n_latent, style_dim) float32; style_dim is 512 for official models
    recon: np.ndarray       # (N, 256, 256, 3) uint8
    mse: np.ndarray         # (N,) float32, reconstruction vs aligned input, both at 256 in [0, 1]
    psnr: np.ndarray        # (N,) float32 dB
    stages: int
    seconds: float = 0.0    # wall time of the model calls, for the stage timings
    finished_unix: float = 0.0  # when the actor finished this result (steady-state throughput in benchmarks)
    edits: EditResult | None = None  # the edit variants of this result's rows, when edit.* is configured
    # When the actor aligned the chunk's photos: the chunk's rows with each ALIGN_PENDING row replaced by the
    # photo's rows, the aligned faces (F, S, S, 3) uint8 of its ok rows, and each face's photo index.
    rows: list[Row] | None = None
    faces: np.ndarray | None = None
    face_photo: list[int] | None = None
    align_seconds: float = 0.0
