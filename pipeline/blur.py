"""A Gaussian blur equal to scipy.ndimage.gaussian_filter(img, [s, s, 0]) (mode 'reflect', truncate 4.0),
without scipy: FFT convolutions in numpy (float64, exact) or torch (float32, fast), whole images or a region.
The FFHQ crop's padding step uses it (pipeline/crop.py)."""
from __future__ import annotations

import numpy as np
import torch

from models.alignment.ffhq_geometry import fast_fft_len

__all__ = ["gaussian_kernel", "gaussian_blur_hw", "blur_region"]


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return phi / phi.sum()


def _blur_axis(a: np.ndarray, axis: int, w: np.ndarray, exact: bool) -> np.ndarray:
    """Correlate float32 HxWxC ``a`` with symmetric 1-D kernel ``w`` along axis 0 or 1 with scipy 'reflect'
    borders, through an FFT. exact=True: float64 (equal to scipy to ~1e-12); False: float32 FFT in torch,
    about 3x faster, off by at most ~1e-3 of a grey level."""
    r = (len(w) - 1) // 2
    n_in = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="symmetric")  # numpy 'symmetric' == scipy 'reflect' (d c b a | a b c d)
    nfft = fast_fft_len(p.shape[axis])
    # y[m] = sum_j w[j] p[m - j]; output pixel i is m = i + 2r (no wrap-around since nfft >= len(p)).
    if exact:
        shape = [1] * a.ndim
        shape[axis] = -1
        fp = np.fft.rfft(p.astype(np.float64), nfft, axis=axis)
        y = np.fft.irfft(fp * np.fft.rfft(w, nfft).reshape(shape), nfft, axis=axis)
        out = np.take(y, np.arange(2 * r, 2 * r + n_in), axis=axis)
        return out.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(p, axis, -1)))
    fw = torch.fft.rfft(torch.from_numpy(w.astype(np.float32)), nfft)
    y = torch.fft.irfft(torch.fft.rfft(t, nfft, dim=-1) * fw, nfft, dim=-1)[..., 2 * r : 2 * r + n_in]
    return np.ascontiguousarray(np.moveaxis(y.numpy(), -1, axis))


def gaussian_blur_hw(img: np.ndarray, sigma: float, truncate: float = 4.0, exact: bool = False) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0]) for a float32 HxWxC array (float32 out).

    Axis 0 first, then axis 1, float32 between them, as scipy does."""
    a = np.asarray(img, dtype=np.float32)
    if sigma <= 1e-15:
        return a.copy()
    w = gaussian_kernel(sigma, truncate)
    if not exact:
        return _blur_hw_torch(a, w)
    return _blur_axis(_blur_axis(a, 0, w, exact), 1, w, exact)


def _blur_hw_torch(a: np.ndarray, w: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    """_blur_axis(_blur_axis(a, 0, w, False), 1, w, False) (the same float32 FFTs, same values) with fewer
    copies: each axis is padded (numpy 'symmetric') and laid out last in a single torch.cat, and the result
    is put back in HxWxC order once. ``rows``: only these rows of the result are computed and returned."""
    r = (len(w) - 1) // 2

    def along_last(x):
        n = x.shape[-1]
        if r <= n:
            p = torch.cat([x[..., :r].flip(-1), x, x[..., n - r :].flip(-1)], dim=-1)
        else:
            p = torch.from_numpy(np.pad(x.numpy(), [(0, 0)] * (x.dim() - 1) + [(r, r)], mode="symmetric"))
        nfft = fast_fft_len(n + 2 * r)
        fw = torch.fft.rfft(torch.from_numpy(w.astype(np.float32)), nfft)
        return torch.fft.irfft(torch.fft.rfft(p, nfft, dim=-1) * fw, nfft, dim=-1)[..., 2 * r : 2 * r + n]

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # (H, W, C)
    y0 = along_last(t.permute(1, 2, 0))  # axis 0: (W, C, H)
    y1 = along_last(y0[..., rows].permute(2, 1, 0))  # axis 1: (H, C, W)
    return y1.permute(0, 2, 1).contiguous().numpy()



def blur_region(f: np.ndarray, ys: slice, xs: slice, w: np.ndarray, exact: bool) -> np.ndarray:
    """gaussian_blur_hw(f)[ys, xs] (to float rounding), computed from the block around it: the kernel
    radius r of context on each side; where the block reaches the image edge it reflects as the full blur
    does, and elsewhere outputs at least r from the block's edge do not see the block's own borders."""
    h, wd = f.shape[:2]
    r = (len(w) - 1) // 2
    a0, a1 = max(ys.start - r, 0), min(ys.stop + r, h)
    b0, b1 = max(xs.start - r, 0), min(xs.stop + r, wd)
    if not exact:
        return _blur_hw_torch(f[a0:a1, b0:b1], w, slice(ys.start - a0, ys.stop - a0))[:, xs.start - b0 : xs.stop - b0]
    t = _blur_axis(f[a0:a1, b0:b1], 0, w, exact)[ys.start - a0 : ys.stop - a0]
    return _blur_axis(t, 1, w, exact)[:, xs.start - b0 : xs.stop - b0]

