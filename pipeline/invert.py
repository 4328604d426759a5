"""Stage 6, invert: aligned uint8 faces -> W+ codes, reconstructions and reconstruction metrics.

Plain functions over a loaded model; ``workers/invert_worker.py`` only holds the model in a Ray actor.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .images import MODEL_INPUT_SIZE, luma, resize_to_model_input, to_uint8
from .records import InvertResult
from .tasks import make_input

__all__ = ["recon_metrics", "invert_faces"]


def recon_metrics(recon: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image MSE and PSNR on a [0, 1] scale; inputs (N, 3, 256, 256) in [-1, 1]."""
    r = recon.detach().float().clamp(-1, 1).add(1).div(2)
    t = target.detach().float().to(r.device)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    t = t.clamp(-1, 1).add(1).div(2)
    mse = (r - t).pow(2).flatten(1).mean(1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return mse.cpu().numpy().astype(np.float32), psnr.cpu().numpy().astype(np.float32)


def _prepare_batch(model, faces: np.ndarray, pad_to: int | None, pin: bool, task: dict | None = None):
    """uint8 faces -> (model input, target of the reconstruction metrics) on the model's device. The bytes
    travel as uint8 (pinned, non-blocking: a quarter of a float32 copy) and are normalised, resized and
    (for 1-channel models) greyed there. ``task``: the E2Style task's input (pipeline.tasks)."""
    if pad_to and len(faces) < pad_to:
        # Compiled models are specialised to one batch shape: pad the last batch instead of recompiling.
        faces = np.concatenate([faces, np.zeros((pad_to - len(faces),) + faces.shape[1:], faces.dtype)])
    u8 = torch.from_numpy(np.ascontiguousarray(faces))
    if pin:
        u8 = u8.pin_memory()
    x = model.preprocess_uint8(u8)
    if task is not None:
        return make_input(x, task, model.input_nc, faces)
    x = resize_to_model_input(x)
    if model.input_nc == 1:
        x = luma(x)
    return x, x


@torch.inference_mode()
def invert_faces(model, faces: np.ndarray, *, stages: int | None = None, batch_size: int = 16,
                 device: str = "cpu", return_images: bool = True, pad_batches: bool = False,
                 task: dict | None = None) -> InvertResult:
    """Invert (N, H, W, 3) uint8 aligned faces in mini-batches of ``batch_size``.

    ``return_images=False`` is the latents-only mode: the last stage's generator pass is skipped, and
    ``recon``/``mse``/``psnr`` are empty/NaN. ``pad_batches`` keeps every batch at ``batch_size``."""
    n = len(faces)
    n_stages = model.num_stages if stages is None else int(stages)
    empty = np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), np.uint8)
    if n == 0:
        return InvertResult(np.zeros((0, model.n_latent, model.decoder.style_dim), np.float32), empty,
                            np.zeros((0,), np.float32), np.zeros((0,), np.float32), n_stages)
    t0 = time.perf_counter()
    pin = str(device).startswith("cuda")
    codes, recons, mses, psnrs = [], [], [], []
    for i in range(0, n, batch_size):
        real = min(batch_size, n - i)
        x, target = _prepare_batch(model, faces[i:i + batch_size], batch_size if pad_batches else None, pin, task)
        out = model.invert(x, stages=stages, return_images=return_images)
        codes.append(out.codes[:real].float().cpu().numpy())
        if return_images:
            images = out.images[:real]
            if target is None:  # sketch / segmentation: no image to compare with
                mse = psnr = np.full((real,), np.nan, np.float32)
            else:
                mse, psnr = recon_metrics(images, target[:real])
            recons.append(to_uint8(images))
            mses.append(mse)
            psnrs.append(psnr)
    if not return_images:
        nan = np.full((n,), np.nan, np.float32)
        return InvertResult(np.concatenate(codes), empty, nan, nan.copy(), n_stages, time.perf_counter() - t0)
    return InvertResult(np.concatenate(codes).astype(np.float32, copy=False), np.concatenate(recons),
                        np.concatenate(mses), np.concatenate(psnrs), n_stages, time.perf_counter() - t0)
