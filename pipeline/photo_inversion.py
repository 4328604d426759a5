"""Photos in memory -> the pipeline's rows and W+ codes, by the pipeline's own steps: the Python API for HxWx3
uint8 photos (or encoded image bytes, or faces already aligned), and the body of the Ray Data entry point
(workers/ray_data.py).

    inverter = PhotoInverter("e2style.pt")                    # model loaded once; alignment as the pipeline's
    out = inverter.invert([photo0, photo1])                   # HxWx3 uint8 arrays or encoded image bytes
    out.rows[k].status, out.codes[k]                          # one row per face (or per photo without one)

Each photo goes the way an input of a pipeline run goes: bytes decoded as the pipeline decodes files
(pipeline.decode), then aligned where the pipeline's actor would align it (dlib on the CPU; on its device when
``align.backend`` resolves to torch there), then inverted by the actor's own class (pipeline.inverter.Inverter).
A photo that cannot be decoded or aligned is a row with its status and error, as in the pipeline's Parquet.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import AlignConfig, InputConfig, PrepareConfig
from .images import MODEL_INPUT_SIZE
from .inverter import Inverter
from .prepare import prepare_item, prepare_photo
from .read import InputItem
from .records import ALIGN_PENDING, PreparedChunk, Row
from .write import aligned_chunk

__all__ = ["PhotoInverter", "PhotoRows", "QUAD_SIZE", "LANDMARKS_SIZE"]

QUAD_SIZE = 8             # a row's quad: (4, 2) corners in photo pixels, flattened
LANDMARKS_SIZE = 136      # a row's landmarks: (68, 2) in photo pixels, flattened
# The Row.source of a photo given in memory: its position in the call's list (rows map back to photos by it).
_SOURCE = "photo:{}"


@dataclass
class PhotoRows:
    """What one call made of its photos, one entry per output row (per face with ``align.policy: all``)."""
    rows: list[Row]          # status, error, face_index, quad, landmarks, score: as in the pipeline's Parquet
    photo: np.ndarray        # (R,) int64: the index of each row's photo in the call's list
    codes: np.ndarray        # (R, n_latent, style_dim) float32; NaN where the row is not ok
    recon: np.ndarray        # (R, 256, 256, 3) uint8 reconstructions (zeros where not ok); (R, 0, 0, 3) without
    recon_mse: np.ndarray    # (R,) float32; NaN where not ok or without reconstructions
    recon_psnr: np.ndarray   # (R,) float32


def _check_photo(value) -> str | None:
    """Why ``value`` is not an HxWx3 uint8 photo (None when it is one)."""
    if not isinstance(value, np.ndarray):
        return f"expected an HxWx3 uint8 array or encoded image bytes, got {type(value).__name__}"
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
        return f"expected an HxWx3 uint8 array or encoded image bytes, got a {value.dtype} array of shape {value.shape}"
    return None


class PhotoInverter:
    """An ``Inverter`` (model loaded once) fed with photos rather than a shard's chunks."""

    def __init__(self, checkpoint: str, *, align: AlignConfig | None = AlignConfig(),
                 max_pixels: int | None = InputConfig.max_pixels, **inverter_kwargs):
        """``align``: the pipeline's alignment settings (None or ``enabled=False``: the inputs are faces, resized
        to ``align.output_size`` as the pipeline does with alignment off). ``max_pixels``: the decompression-bomb
        limit for encoded bytes (input.max_pixels). ``inverter_kwargs``: Inverter's (device, precision, stages,
        batch_size, return_images, ...)."""
        align = align or AlignConfig(enabled=False)
        self.inverter = Inverter(checkpoint, align=align if align.enabled else None, **inverter_kwargs)
        backend = self.inverter.align_backend
        # The prepare step as a pipeline run's CPU task does it, with align.backend as this actor resolved it.
        self.prepare = PrepareConfig(InputConfig(max_pixels=max_pixels),
                                     dataclasses.replace(align, backend=backend) if backend else align,
                                     None, chunk_size=1, task="invert", keep_originals=False)

    def info(self) -> dict:
        return self.inverter.info()

    def invert(self, photos: Sequence, keys: Sequence[str] | None = None) -> PhotoRows:
        """``photos``: HxWx3 uint8 arrays (RGB) or encoded image bytes (JPEG, PNG, ...: anything the pipeline
        reads); ``keys``: one per photo (default: its index), the rows' keys as the pipeline makes them."""
        if keys is not None and len(keys) != len(photos):
            raise ValueError(f"{len(keys)} keys for {len(photos)} photos")
        rows: list[Row] = []
        faces: list[np.ndarray] = []
        pending: list[np.ndarray] = []   # photos the actor aligns (align.backend torch)
        timings: dict[str, float] = {}
        for i, value in enumerate(photos):
            key = str(i) if keys is None else str(keys[i])
            if isinstance(value, (bytes, bytearray, memoryview)):
                prepared = prepare_item(InputItem(key, _SOURCE.format(i), bytes(value)), self.prepare, timings)
            elif (why := _check_photo(value)) is not None:
                prepared = [(Row(key, _SOURCE.format(i), status="decode_error", error=why), None)]
            else:
                prepared = prepare_photo(Row(key, _SOURCE.format(i)), value, self.prepare, timings)
            for row, image in prepared:
                rows.append(row)
                if image is not None:
                    (pending if row.status == ALIGN_PENDING else faces).append(image)
        size = self.prepare.align.output_size
        chunk = PreparedChunk("photos", 0, rows, np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8),
                              timings, len(photos), None, pending if self.inverter.aligner is not None else None)
        result = self.inverter.invert_chunks(chunk)[0]
        return self._rows(aligned_chunk(chunk, result), result)

    def _rows(self, chunk: PreparedChunk, result) -> PhotoRows:
        """The chunk's rows (as alignment made them) with their codes, reconstructions and metrics."""
        info = self.inverter.info()
        n = len(chunk.rows)
        codes = np.full((n, info["n_latent"], info["style_dim"]), np.nan, np.float32)
        side = MODEL_INPUT_SIZE if self.inverter.return_images else 0
        recon = np.zeros((n, side, side, 3), np.uint8)
        mse = np.full((n,), np.nan, np.float32)
        psnr = np.full((n,), np.nan, np.float32)
        ok = [k for k, r in enumerate(chunk.rows) if r.status == "ok"]
        if ok:
            codes[ok] = result.codes
            if side:
                recon[ok], mse[ok], psnr[ok] = result.recon, result.mse, result.psnr
        photo = np.array([int(r.source.rpartition(":")[2]) for r in chunk.rows], np.int64)
        return PhotoRows(chunk.rows, photo, codes, recon, mse, psnr)
