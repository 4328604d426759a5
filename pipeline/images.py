"""Image helpers every stage may use: uint8 <-> model tensors, resizes, encoding. Imports no stage."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["MODEL_INPUT_SIZE", "as_rgb_uint8", "resize_square", "resize_nearest", "resize_to_model_input", "luma",
           "to_model_input", "to_uint8", "encode_image"]

MODEL_INPUT_SIZE = 256  # E2Style's encoders take 256x256; its reconstructions are pooled to 256
_EXT_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def as_rgb_uint8(image) -> np.ndarray:
    """An HxWx3 uint8 view of ``image`` (grey repeated, alpha dropped); TypeError/ValueError otherwise."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    return a


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased (Lanczos) resize of an HxWx3 uint8 image to size x size, without cropping."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected HxWx3, got {a.shape}")
    if a.shape[0] == size and a.shape[1] == size:
        return a.copy()
    out = Image.fromarray(np.ascontiguousarray(a), "RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an HxWx3 uint8 label map (class ids must not be interpolated)."""
    a = np.asarray(img)
    if a.shape[0] == size and a.shape[1] == size:
        return a.copy()
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.Resampling.NEAREST))


def resize_to_model_input(x: torch.Tensor, size: int = MODEL_INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), bilinear and antialiased (unchanged when already that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of (N, 3, H, W) -> (N, 1, H, W)."""
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def to_model_input(faces: np.ndarray, input_nc: int = 3) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, input_nc, 256, 256) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    x = resize_to_model_input(x)
    return luma(x) if input_nc == 1 else x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in about [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_image(img: np.ndarray, fmt: str = "jpg", size: int | None = None, quality: int = 95) -> bytes:
    """HxWx3 uint8 -> file bytes (jpg | png | webp), Lanczos-resized to size x size when ``size`` is given."""
    im = Image.fromarray(np.ascontiguousarray(img), "RGB")
    if size and (im.width != size or im.height != size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality} if fmt in ("jpg", "webp") else {"compress_level": 6}
    im.save(buf, format=_EXT_FORMAT[fmt], **kw)
    return buf.getvalue()
