"""Stage 4, crop: the FFHQ crop, NVlabs' ffhq-dataset ``recreate_aligned_images`` (rotate_level=True, no
random shift) for given 68 landmarks, and the quad it cuts along.

Deviations are only in how the same numbers are computed:
  * the Lanczos shrink resizes only the region that the crop keeps (Pillow's ``box=`` argument, which
    gives the same pixels as resizing the whole photo and cropping);
  * scipy.ndimage.gaussian_filter is reimplemented with numpy/torch (pipeline/blur.py);
  * the padding step's blur, median blend and blur blend are evaluated only on the edge band where the
    blend weights are > 0 (the blends leave the other pixels unchanged), the blends in float32.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.alignment.ffhq_geometry import crop_and_pad, ffhq_quad

from .blur import blur_region, gaussian_kernel
from .images import as_rgb_uint8

__all__ = ["ffhq_crop"]


def _band_regions(wy: np.ndarray, wx: np.ndarray):
    """(row slice, col slice) pieces covering exactly the pixels where max(wy[y], wx[x]) > 0:
    full-width top/bottom strips and left/right strips between them (none overlap)."""
    h, w = len(wy), len(wx)
    ry, rx = np.flatnonzero(wy <= 0), np.flatnonzero(wx <= 0)
    # The weights are 0 on one contiguous interior interval (they fall, then rise again).
    if len(ry) == 0 or len(rx) == 0:
        return [(slice(0, h), slice(0, w))]
    y0, y1, x0, x1 = int(ry[0]), int(ry[-1]) + 1, int(rx[0]), int(rx[-1]) + 1
    regs = [(slice(0, y0), slice(0, w)), (slice(y1, h), slice(0, w)), (slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, w))]
    return [(a, b) for a, b in regs if a.stop > a.start and b.stop > b.start]



def _median_hw(f: np.ndarray) -> np.ndarray:
    """np.median(f, axis=(0, 1)) for a float32 HxWxC array, one channel at a time (same values)."""
    n = f.shape[0] * f.shape[1]
    k = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]
    out = np.empty(f.shape[2], dtype=f.dtype)
    for c in range(f.shape[2]):
        part = f[:, :, c].flatten()  # always a copy: partitioned in place
        part.partition(k)
        out[c] = np.mean(part[k])
    return out


def _blur_pad_blend(f: np.ndarray, pad, sigma: float, exact: bool) -> None:
    """In place on the reflect-padded float32 image ``f``, the FFHQ padding step:

        mask = max(1 - min(x / pad[0], (w-1-x) / pad[2]), 1 - min(y / pad[1], (h-1-y) / pad[3]))
        f += (gaussian_filter(f, [sigma, sigma, 0]) - f) * clip(mask * 3 + 1, 0, 1)
        f += (median(f, axis=(0, 1)) - f) * clip(mask, 0, 1)

    Both blends change only pixels where their weight is > 0 (a band along the edges), so they, and the
    blur, are evaluated there only. The weights are computed in float64 as in the reference and the blends
    done in float32 in place with one ``lerp`` each (the reference multiplies in float64: rounding
    differences of ~1e-5 grey)."""
    h, wd, _ = f.shape
    x = np.arange(wd)
    y = np.arange(h)
    mx = 1.0 - np.minimum(np.float32(x) / pad[0], np.float32(wd - 1 - x) / pad[2])
    my = 1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3])
    ft = torch.from_numpy(f)

    def blend(wy: np.ndarray, wx: np.ndarray, targets) -> None:
        wy32, wx32 = torch.from_numpy(wy.astype(np.float32)), torch.from_numpy(wx.astype(np.float32))
        for (ys, xs), target in zip(_band_regions(wy, wx), targets):
            ft[ys, xs].lerp_(target, torch.maximum(wy32[ys, None, None], wx32[None, xs, None]))

    if sigma > 1e-15:
        wx, wy = np.clip(mx * 3.0 + 1.0, 0.0, 1.0), np.clip(my * 3.0 + 1.0, 0.0, 1.0)
        k = gaussian_kernel(sigma)
        # Every strip is blurred before any is blended: the blur reads unblended neighbours.
        blurred = [torch.from_numpy(blur_region(f, ys, xs, k, exact)) for ys, xs in _band_regions(wy, wx)]
        blend(wy, wx, blurred)
    med = torch.from_numpy(_median_hw(f))
    cx, cy = np.clip(mx, 0.0, 1.0), np.clip(my, 0.0, 1.0)
    blend(cy, cx, (med.expand(ys.stop - ys.start, xs.stop - xs.start, 3) for ys, xs in _band_regions(cy, cx)))


def ffhq_crop(
    image,
    landmarks,
    output_size: int = 1024,
    transform_size: int = 4096,
    enable_padding: bool = True,
    quad: np.ndarray | None = None,
    qsize: float | None = None,
    exact_blur: bool = False,
) -> np.ndarray:
    """The FFHQ crop of ``image`` (HxWx3 uint8) for given 68 landmarks; returns output_size^2 x 3 uint8.

    Equals NVlabs' ``recreate_aligned_images`` (rotate_level=True, random_shift=0) to rounding.
    """
    img = as_rgb_uint8(image)
    if quad is None or qsize is None:
        quad, qsize = ffhq_quad(landmarks)
    quad = np.array(quad, dtype=np.float64)
    qsize = float(qsize)
    H, W = img.shape[:2]

    # Shrink (Lanczos), restricted to the region the crop keeps.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(W) / shrink)), int(np.rint(float(H) / shrink)))
        quad /= shrink
        qsize /= shrink
        size = rsize
    else:
        size = (W, H)

    # Crop.
    crop, pad, border = crop_and_pad(quad, qsize, size)
    if shrink > 1:
        sx, sy = W / size[0], H / size[1]
        pil = Image.fromarray(np.ascontiguousarray(img), "RGB").resize(
            (crop[2] - crop[0], crop[3] - crop[1]),
            Image.Resampling.LANCZOS,
            box=(crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy),
        )
        arr = None
    else:
        arr = img[crop[1] : crop[3], crop[0] : crop[2]]
        pil = None
    quad -= crop[0:2]

    # Pad.
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        src = np.asarray(pil) if arr is None else arr
        f = np.pad(np.float32(src), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        _blur_pad_blend(f, pad, qsize * 0.02, exact_blur)
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        pil = Image.fromarray(f.astype(np.uint8), "RGB")
        quad += pad[:2]
    elif pil is None:
        pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")

    # Transform.
    out = pil.transform(
        (transform_size, transform_size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR
    )
    if output_size < transform_size:
        out = out.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)
