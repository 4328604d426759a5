"""The FFHQ padding step in PyTorch (NVlabs' ``recreate_aligned_images``: reflect padding, the blur blended in towards
the edges, then the median), per face (the reference, ``_blur_pad``) and for many faces at once
(``blur_pad_faces``), for models/alignment/ffhq_crop.py.

The padding blur (scipy.ndimage.gaussian_filter, mode 'reflect') is a float32 FFT convolution like the reference's
own, so padded crops may differ from it by one grey level where a value lies near .5. The batched form lays the
faces of a group out in one dense (B, H, W, 3) tensor (the group's largest canvas; faces grouped by size so that
little of it is empty) and runs each step once for the group: the reflect padding as one gather, each blur pass as
one FFT of all lines with each face's own kernel and reflection, the median as one sort with the empty cells last,
the blends with per-face weight tables. Its FFT lengths are the group's, not the face's, so its blur may differ
from the per-face one in the last bits of a float32 (a grey level where a value lies near .5); every other step
is the same float32 arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

from .device import upload, upload_many
from .ffhq_geometry import fast_fft_len

__all__ = ["blur_pad_faces", "PaddedGroup"]

# A group's dense canvas: at most this many pixels (its steps hold up to about 150 bytes a pixel at once: the
# gather's indices, the FFT passes' lines and spectra, the median's sort with its indices), and at most this many
# times the pixels of its faces' own canvases.
GROUP_PIXELS = 1 << 23
GROUP_WASTE = 2.0


# -- the torch reference, one face ----------------------------------------------------------------------------------

def _reflect_index(n: int, before: int, after: int, edge_repeats: bool, device) -> torch.Tensor:
    """Indices into range(n) of an axis padded by ``before``/``after``: numpy's 'reflect' (d c b | a b c d,
    edge_repeats=False) or 'symmetric' (c b a | a b c, edge_repeats=True), for pads of any length."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n if edge_repeats else 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - (1 if edge_repeats else 0) - i)


def _gaussian_blur(f: torch.Tensor, sigma: float, bucketed: bool | None = None) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(f, [sigma, sigma, 0]) (mode 'reflect', truncate 4) of float32 (H, W, 3):
    rows then columns, float32 between, each a float32 FFT convolution (the reference's own method).

    ``bucketed`` (default: on CUDA): FFT lengths and batches rounded up to powers of two (zero rows added).
    cuFFT makes a plan for each (length, batch) and torch caches them; every face has its own size, and a new
    plan costs milliseconds of host time per face (BENCHMARKS.md), so the sizes are bucketed into a few dozen
    plans. On CPUs plans are cheap: fast lengths, no padding."""
    if bucketed is None:
        bucketed = f.device.type == "cuda"
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * t * t)
    kernel /= kernel.sum()

    def along_last(a: torch.Tensor) -> torch.Tensor:
        n = a.shape[-1]
        padded = a[..., _reflect_index(n, radius, radius, True, a.device)]
        lines = padded.reshape(-1, padded.shape[-1])
        if bucketed:
            nfft = 1 << (n + 2 * radius - 1).bit_length()
            lines = torch.nn.functional.pad(lines, (0, 0, 0, (1 << (len(lines) - 1).bit_length()) - len(lines)))
        else:
            nfft = fast_fft_len(n + 2 * radius)
        k = torch.fft.rfft(upload(kernel.astype(np.float32), a.device), nfft)
        # Circular convolution; outputs from 2r on see no wrap-around (nfft >= n + 2r).
        out = torch.fft.irfft(torch.fft.rfft(lines, nfft) * k, nfft)
        return out[: padded[..., 0].numel(), 2 * radius : 2 * radius + n].reshape(*a.shape[:-1], n)

    down = along_last(f.permute(1, 2, 0))  # (W, 3, H)
    return along_last(down.permute(2, 1, 0)).permute(0, 2, 1)  # (H, 3, W) -> (H, W, 3)


def _pad_blend_weights(n: int, before: int, after: int) -> np.ndarray:
    """1 - min(i / before, (n - 1 - i) / after) along one axis, as the reference computes it (float32
    positions over numpy int64 pads: float64)."""
    i = np.arange(n)
    return 1.0 - np.minimum(np.float32(i) / np.int64(before), np.float32(n - 1 - i) / np.int64(after))


def _channel_median(flat: torch.Tensor) -> torch.Tensor:
    """np.median(flat, axis=0) of an (n, 3) float tensor: the middle value, or the mean of the two middle
    values when n is even (in the tensor's dtype, as numpy's float32 mean of two).

    One sort along the pixel axis of the (3, n) transpose, a segmented radix sort on CUDA, where torch.kthvalue
    was most of the crop's GPU time on padded faces (BENCHMARKS.md); on CPU the sort is slower than kthvalue but
    the crop's GPU path matters. The sorted values at n // 2 (and n // 2 - 1) are the very values kthvalue
    selects, so the median is bit-identical."""
    n = flat.shape[0]
    ordered = torch.sort(flat.t().contiguous(), dim=1).values
    if n % 2:
        return ordered[:, n // 2]
    return (ordered[:, n // 2 - 1] + ordered[:, n // 2]) / 2


def _blur_pad(crop: torch.Tensor, pad: tuple, sigma: float) -> torch.Tensor:
    """The FFHQ padding step on an (h, w, 3) uint8 crop: reflect padding, the blur blended in towards the
    edges, then the median; rounded to uint8."""
    h, w, _ = crop.shape
    dev = crop.device
    rows = _reflect_index(h, pad[1], pad[3], False, dev)
    cols = _reflect_index(w, pad[0], pad[2], False, dev)
    f = crop[rows][:, cols].float()
    H, W, _ = f.shape
    mx, my = _pad_blend_weights(W, pad[0], pad[2]), _pad_blend_weights(H, pad[1], pad[3])

    def weight(wy: np.ndarray, wx: np.ndarray) -> torch.Tensor:
        wy32, wx32 = upload(wy.astype(np.float32), dev), upload(wx.astype(np.float32), dev)
        return torch.maximum(wy32[:, None, None], wx32[None, :, None])

    if sigma > 1e-15:
        f.lerp_(_gaussian_blur(f, sigma), weight(np.clip(my * 3.0 + 1.0, 0.0, 1.0), np.clip(mx * 3.0 + 1.0, 0.0, 1.0)))
    median = _channel_median(f.reshape(-1, 3))
    f.lerp_(median.expand_as(f), weight(np.clip(my, 0.0, 1.0), np.clip(mx, 0.0, 1.0)))
    return f.round_().clamp_(0, 255).to(torch.uint8)



# -- many faces at once -------------------------------------------------------------------------------------------

class PaddedGroup:
    """A group of padded canvases in one dense (B, H, W, 3) uint8 tensor: face ``faces[b]`` (an index of the
    caller's) is ``canvases[b, :h_b, :w_b]``; as a flat (B * H * W, 3) buffer its pixel (x, y) is row
    ``base[b] + y * W + x``."""

    def __init__(self, canvases: torch.Tensor, faces: np.ndarray):
        self.canvases, self.faces = canvases, faces
        B, H, W, _ = canvases.shape
        self.flat = canvases.view(-1, 3)
        self.base = np.arange(B, dtype=np.int64) * H * W
        self.stride = np.full(B, W, dtype=np.int64)


def _groups(sizes: np.ndarray) -> list[np.ndarray]:
    """Faces (indices into ``sizes``, (N, 2) canvas (w, h)) in groups of similar size, largest first: a group's
    dense canvas (its count times its largest w and h) stays within GROUP_PIXELS (a larger face alone) and within
    GROUP_WASTE times its faces' own pixels."""
    order = np.argsort(-(sizes[:, 0] * sizes[:, 1]), kind="stable")
    groups: list[list[int]] = []
    w = h = own = 0
    for i in order.tolist():
        fw, fh = int(sizes[i, 0]), int(sizes[i, 1])
        nw, nh = max(w, fw), max(h, fh)
        dense = (len(groups[-1]) + 1) * nw * nh if groups else 0
        if groups and dense <= GROUP_PIXELS and dense <= GROUP_WASTE * (own + fw * fh):
            groups[-1].append(i)
            w, h, own = nw, nh, own + fw * fh
        else:
            groups.append([i])
            w, h, own = fw, fh, fw * fh
    return [np.array(g, dtype=np.int64) for g in groups]


def _reflect(k: torch.Tensor, n: torch.Tensor, edge_repeats: bool) -> torch.Tensor:
    """_reflect_index's mapping of padded positions ``k`` (already shifted by the pad before) into range(n),
    per face (``n`` broadcasting against ``k``)."""
    if edge_repeats:
        period = 2 * n
        i = torch.remainder(k, period)
        return torch.where(i < n, i, period - 1 - i)
    period = torch.where(n > 1, 2 * (n - 1), 1)
    i = torch.remainder(k, period)
    return torch.where(i < n, i, period - i)


def _blend_weights(n: np.ndarray, before: np.ndarray, after: np.ndarray, length: int) -> np.ndarray:
    """_pad_blend_weights of each face along one axis, (B, length) (past a face's n: unused values)."""
    i = np.arange(length)[None, :]
    return 1.0 - np.minimum(i.astype(np.float32) / before[:, None],
                            (n[:, None] - 1 - i).astype(np.float32) / after[:, None])


def _blur_lines(a: torch.Tensor, n: torch.Tensor, radius: np.ndarray, kernels: list, bucketed: bool) -> torch.Tensor:
    """_gaussian_blur's pass along dim 1 of (B, N, X) float32 for every face at once: face b's lines are its
    first n[b] values, reflected by radius[b] (symmetric) and convolved with kernels[b] (its 2 r + 1 taps) by a
    float32 FFT. Returns (B, N, X); past a face's n, unused values.

    ``bucketed``: as _gaussian_blur's (cuFFT plans per length and batch, each costing milliseconds of host time
    when new): the FFT length and the number of lines (the lines of all the group's faces, one contiguous row
    each) rounded up to powers of two, so that a few dozen plans serve every chunk."""
    B, N, X = a.shape
    longest = N + 2 * int(radius.max())
    nfft = 1 << (longest - 1).bit_length() if bucketed else fast_fft_len(longest)
    taps = np.zeros((_bucket(B, bucketed), nfft), dtype=np.float32)
    for b, k in enumerate(kernels):
        taps[b, : len(k)] = k
    taps_t, r_t = upload_many([taps, radius.astype(np.int64)], a.device)
    r = r_t[:, None]
    k = torch.arange(nfft, device=a.device)[None, :]
    faces = torch.arange(B, device=a.device)[:, None]
    lines = a[faces, _reflect(k - r, n[:, None], True)]                                  # (B, nfft, X)
    lines.mul_((k < n[:, None] + 2 * r).to(lines.dtype)[:, :, None])
    rows = lines.transpose(1, 2).reshape(B * X, nfft)
    rows = torch.nn.functional.pad(rows, (0, 0, 0, _bucket(B * X, bucketed) - B * X))
    spectrum = torch.fft.rfft(rows, nfft)[: B * X].view(B, X, -1)
    spectrum.mul_(torch.fft.rfft(taps_t, nfft)[:B, None, :])
    out = torch.fft.irfft(spectrum.view(B * X, -1), nfft).view(B, X, nfft)
    # Outputs from 2r on see no wrap-around (nfft >= n + 2r).
    take = (2 * r + torch.arange(N, device=a.device)[None, :])[:, None, :].expand(B, X, N)
    return out.gather(2, take).transpose(1, 2)


def _bucket(count: int, bucketed: bool) -> int:
    """A batch of ``count`` FFT lines rounded up to a power of two when ``bucketed``."""
    return 1 << max(count - 1, 0).bit_length() if bucketed else count


def _gaussian_taps(sigma: float) -> np.ndarray:
    """_gaussian_blur's kernel (truncate 4) as float32."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * t * t)
    kernel /= kernel.sum()
    return kernel.astype(np.float32)


def _pad_group(src: torch.Tensor, base: np.ndarray, stride: np.ndarray, crops: np.ndarray, pads: np.ndarray,
               sigmas: np.ndarray, bucketed: bool) -> torch.Tensor:
    """_blur_pad of a group's faces in one (B, H, W, 3) uint8 tensor (see blur_pad_faces' arguments)."""
    dev = src.device
    cw, ch = crops[:, 0], crops[:, 1]
    W_b, H_b = cw + pads[:, 0] + pads[:, 2], ch + pads[:, 1] + pads[:, 3]
    B, H, W = len(base), int(H_b.max()), int(W_b.max())
    blurs = sigmas > 1e-15
    kernels = [_gaussian_taps(s) if b else np.ones(1, np.float32) for s, b in zip(sigmas.tolist(), blurs.tolist())]
    radius = np.array([(len(k) - 1) // 2 for k in kernels], dtype=np.int64)
    my, mx = _blend_weights(H_b, pads[:, 1], pads[:, 3], H), _blend_weights(W_b, pads[:, 0], pads[:, 2], W)
    blur_y = np.where(blurs[:, None], np.clip(my * 3.0 + 1.0, 0.0, 1.0), 0.0).astype(np.float32)
    blur_x = np.where(blurs[:, None], np.clip(mx * 3.0 + 1.0, 0.0, 1.0), 0.0).astype(np.float32)
    table, blur_y, blur_x, med_y, med_x = upload_many(
        [np.stack([base, stride, cw, ch, pads[:, 0], pads[:, 1], W_b, H_b], axis=1).astype(np.int64), blur_y,
         blur_x, np.clip(my, 0.0, 1.0).astype(np.float32), np.clip(mx, 0.0, 1.0).astype(np.float32)], dev)
    base_t, stride_t, cw_t, ch_t, left_t, top_t, W_t, H_t = (table[:, j] for j in range(8))
    rows = _reflect(torch.arange(H, device=dev)[None, :] - top_t[:, None], ch_t[:, None], False)     # (B, H)
    cols = _reflect(torch.arange(W, device=dev)[None, :] - left_t[:, None], cw_t[:, None], False)    # (B, W)
    index = (base_t[:, None, None] + rows[:, :, None] * stride_t[:, None, None]) + cols[:, None, :]
    f = src[index].float()                                                                          # (B, H, W, 3)
    # The blur: along the rows' axis (every column), then along the columns' axis, as _gaussian_blur.
    down = _blur_lines(f.view(B, H, W * 3), H_t, radius, kernels, bucketed).reshape(B, H, W, 3)
    across = _blur_lines(down.permute(0, 2, 1, 3).reshape(B, W, H * 3), W_t, radius, kernels, bucketed)
    blurred = across.reshape(B, W, H, 3).permute(0, 2, 1, 3)
    f.lerp_(blurred, torch.maximum(blur_y[:, :, None, None], blur_x[:, None, :, None]))
    # The median of each face's own pixels: the dense canvas' other cells sort last.
    inside = (torch.arange(H, device=dev)[None, :, None] < H_t[:, None, None]) & (
        torch.arange(W, device=dev)[None, None, :] < W_t[:, None, None])
    ordered = torch.sort(torch.where(inside[..., None], f, torch.inf).view(B, H * W, 3).transpose(1, 2), dim=2).values
    count = (W_t * H_t)[:, None, None].expand(B, 3, 1)
    upper = ordered.gather(2, count // 2).squeeze(2)
    lower = ordered.gather(2, torch.clamp(count // 2 - 1, min=0)).squeeze(2)
    median = torch.where((count % 2 == 1).squeeze(2), upper, (lower + upper) / 2)                  # (B, 3)
    f.lerp_(median[:, None, None, :].expand_as(f), torch.maximum(med_y[:, :, None, None], med_x[:, None, :, None]))
    return f.round_().clamp_(0, 255).to(torch.uint8)


def blur_pad_faces(src: torch.Tensor, base, stride, crops, pads, sigmas, bucketed: bool | None = None
                   ) -> list[PaddedGroup]:
    """The padding step of many faces: face i's crop is the (w, h) = ``crops[i]`` window of the flat (P, 3) uint8
    ``src`` at row ``base[i]`` with row stride ``stride[i]``; ``pads[i]`` (left, top, right, bottom) and
    ``sigmas[i]`` as _blur_pad's. Returns the padded canvases in groups (see PaddedGroup; ``faces``: indices
    into these arrays), each group made by one pass of every step. ``bucketed``: as _gaussian_blur's."""
    if bucketed is None:
        bucketed = src.device.type == "cuda"
    base, stride = np.asarray(base, dtype=np.int64), np.asarray(stride, dtype=np.int64)
    crops, pads = np.asarray(crops, dtype=np.int64).reshape(-1, 2), np.asarray(pads, dtype=np.int64).reshape(-1, 4)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    canvas = crops + pads[:, 0:2] + pads[:, 2:4]
    return [PaddedGroup(_pad_group(src, base[g], stride[g], crops[g], pads[g], sigmas[g], bucketed), g)
            for g in _groups(canvas)]
