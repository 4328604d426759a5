"""Inversion inside a user's own Ray Data pipeline: ``InvertPhotos``, a callable class for ``map_batches``.

    import ray
    from workers.ray_data import InvertPhotos

    ds = ray.data.read_binary_files("s3://bucket/photos/")          # a "bytes" column of encoded images
    out = ds.map_batches(InvertPhotos, fn_constructor_kwargs={"checkpoint": "s3://bucket/e2style.pt",
                                                              "image_column": "bytes"},
                         num_gpus=1, concurrency=4, batch_size=64)

Each actor loads the model once (``__init__``); each batch (a dict of numpy arrays, as Ray Data gives it) is
decoded, aligned and inverted as the pipeline does it (pipeline/photo_inversion.py): alignment with dlib on a
CPU actor, on the GPU for an actor with one (``align.backend`` auto), inversion by the pipeline's actor class.
The batch comes back with one row per face (per photo with ``align.policy: largest``), its other columns
repeated for each row, and the columns of the pipeline's Parquet: ``status``, ``error``, ``face_index``,
``codes`` (n_latent, style_dim) float32 (NaN where the row is not ok), ``quad``, ``landmarks``, ``score``,
``recon_mse``, ``recon_psnr``, and ``recon`` (256x256x3 uint8) unless ``return_images=False``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import AlignConfig, InputConfig
from pipeline.photo_inversion import LANDMARKS_SIZE, QUAD_SIZE, PhotoInverter

__all__ = ["InvertPhotos"]


def _floats(values: list, size: int) -> np.ndarray:
    """(R, size) float32 from a list of ``size`` floats or None per row (NaN for None)."""
    out = np.full((len(values), size), np.nan, np.float32)
    for k, v in enumerate(values):
        if v is not None:
            out[k] = v
    return out


class InvertPhotos:
    def __init__(self, checkpoint: str, *, image_column: str = "image", align: AlignConfig | dict | None = None,
                 max_pixels: int | None = InputConfig.max_pixels, **inverter_kwargs: Any):
        """``checkpoint``: an E2Style checkpoint (any URL the pipeline reads; ``endpoint_url`` for S3-compatible
        stores). ``image_column``: the batch's column of photos, HxWx3 uint8 arrays or encoded image bytes.
        ``align``: the pipeline's align.* settings (an AlignConfig or a dict of its keys; default: the
        pipeline's, alignment on; ``{"enabled": False}`` for faces already aligned). ``inverter_kwargs``:
        device, precision, stages, batch_size, return_images, num_threads, compile, endpoint_url."""
        if isinstance(align, dict):
            align = AlignConfig(**align)
        self.image_column = image_column
        self.photos = PhotoInverter(checkpoint, align=align or AlignConfig(), max_pixels=max_pixels, **inverter_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.image_column not in batch:
            raise KeyError(f"InvertPhotos: the batch has no column {self.image_column!r} (columns: {sorted(batch)}); "
                           "pass image_column= in fn_constructor_kwargs")
        out = self.photos.invert(list(batch[self.image_column]))
        rows = out.rows
        result = {name: np.asarray(values)[out.photo] for name, values in batch.items() if name != self.image_column}
        result.update({
            "face_index": np.array([r.face_index for r in rows], np.int64),
            "status": np.array([r.status for r in rows], object),
            "error": np.array([r.error for r in rows], object),
            "codes": out.codes,
            "quad": _floats([r.quad for r in rows], QUAD_SIZE),
            "landmarks": _floats([r.landmarks for r in rows], LANDMARKS_SIZE),
            "score": np.array([np.nan if r.score is None else r.score for r in rows], np.float64),
            "recon_mse": out.recon_mse,
            "recon_psnr": out.recon_psnr,
        })
        if self.photos.inverter.return_images:
            result["recon"] = out.recon
        return result
