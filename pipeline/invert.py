"""Stage 4, invert: aligned uint8 faces -> W+ codes, reconstructions and reconstruction metrics.

Plain functions over a loaded model; ``workers/invert_worker.py`` only holds the model in a Ray actor.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MODEL_INPUT_SIZE", "InvertResult", "to_model_input", "to_uint8", "recon_metrics", "invert_faces",
           "resolve_device", "fetch_checkpoint", "file_sha256"]

MODEL_INPUT_SIZE = 256  # E2Style's encoders take 256x256; its reconstructions are pooled to 256


@dataclass
class InvertResult:
    codes: np.ndarray       # (N, n_latent, style_dim) float32; style_dim is 512 for official models
    recon: np.ndarray       # (N, 256, 256, 3) uint8
    mse: np.ndarray         # (N,) float32, reconstruction vs aligned input, both at 256 in [0, 1]
    psnr: np.ndarray        # (N,) float32 dB
    stages: int
    seconds: float = 0.0    # wall time of the model calls, for the stage timings
    finished_unix: float = 0.0  # when the actor finished this result (steady-state throughput in benchmarks)
    edits: object | None = None  # pipeline.edit.EditResult of this result's rows, when edit.* is configured


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def to_model_input(faces: np.ndarray, input_nc: int = 3) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, input_nc, 256, 256) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != MODEL_INPUT_SIZE or x.shape[-2] != MODEL_INPUT_SIZE:
        x = F.interpolate(x, size=(MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    if input_nc == 1:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in about [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
        from .tasks import make_input
        return make_input(x, task, model.input_nc, faces)
    if x.shape[-1] != MODEL_INPUT_SIZE or x.shape[-2] != MODEL_INPUT_SIZE:
        x = F.interpolate(x, size=(MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    if model.input_nc == 1:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
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


def file_sha256(fs, path: str, chunk: int = 8 << 20) -> str:
    import hashlib
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fetch_checkpoint(url: str, endpoint_url: str | None = None, sha256: str | None = None,
                     cache_dir: str | None = None) -> str:
    """A local path for ``url``: itself when local, else a cached download named by its sha256 (so a
    checkpoint replaced at the same URL is never served stale from the cache)."""
    from .storage import get_fs, is_local

    if url.startswith("factory:"):
        return factory_checkpoint(url, cache_dir)
    fs, path = get_fs(url, endpoint_url)
    if is_local(fs):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "e2style_checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    import hashlib
    tag = sha256 or hashlib.sha1(url.encode()).hexdigest()
    local = os.path.join(cache_dir, tag[:24] + "_" + os.path.basename(path))
    if not os.path.exists(local):
        tmp = local + f".{os.getpid()}.part"
        fs.get_file(path, tmp)
        os.replace(tmp, local)  # concurrent actors on one node: the last rename wins, both are whole
    return local


def factory_checkpoint(url: str, cache_dir: str | None = None) -> str:
    """``factory:resolution=64,stages=2,seed=0``: a small random checkpoint from ``models.factory``, written
    once to a local cache. It makes the demo run on a fresh clone with no download; its outputs are
    noise-like reconstructions, which is all a random model can give."""
    params = {"resolution": 64, "stages": 2, "seed": 0}
    body = url[len("factory:"):].strip()
    for part in filter(None, (p.strip() for p in body.split(","))):
        k, _, v = part.partition("=")
        if k not in params or not v.strip().isdigit():
            raise ValueError(f"model.checkpoint: bad factory spec {url!r}; expected factory:resolution=64,stages=2,seed=0")
        params[k] = int(v)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "e2style_checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "factory_r{resolution}_s{stages}_seed{seed}.pt".format(**params))
    if not os.path.exists(path):
        from models.factory import write_checkpoint

        write_checkpoint(path, **params)
    return path
