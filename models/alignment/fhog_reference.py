"""dlib's fHOG (``extract_fhog_features``, cell 8, 31 planes): its constants and the torch reference of the two
stages (cell histograms; block normalisation and features), bit for bit as dlib (dlib-bin 20.0.1: AVX, no FMA).
Every arithmetic step is a separate eager operation, so each product is rounded to float32 before the addition
that uses it, as in dlib. The Triton kernels (fhog.py) do the same operations in the same order.
"""
from __future__ import annotations

import numpy as np
import torch

from .device import upload
from .formats import CELL_SIZE

__all__ = ["DIRECTIONS", "LANE_OFFSETS", "BLOCK_EPSILON", "TRUNCATION", "NORM_SCALE", "TEXTURE_SCALE"]

# dlib's unit vectors for the 9 unsigned orientation bins (fhog.h), as float32 like dlib's matrix<float>.
DIRECTIONS = np.array([
    (1.0000, 0.0000), (0.9397, 0.3420), (0.7660, 0.6428), (0.500, 0.8660), (0.1736, 0.9848),
    (-0.1736, 0.9848), (-0.5000, 0.8660), (-0.7660, 0.6428), (-0.9397, 0.3420)], dtype=np.float32)
# Lane order of dlib's 4-wide block normalisation: lane k normalises by the 2x2 block of cells whose top-left
# cell is (y + dy, x + dx) in norm coordinates (see fhog.h, z1..z4).
LANE_OFFSETS = ((1, 1), (0, 1), (1, 0), (0, 0))
# dlib's block normalisation (fhog.h): a block's energy plus BLOCK_EPSILON, its norm times TRUNCATION caps each
# histogram value, NORM_SCALE / that cap scales it; the texture planes are the capped sums times TEXTURE_SCALE
# (2 * 0.2357). Applied in float32.
BLOCK_EPSILON = 0.0001
TRUNCATION = 0.2
NORM_SCALE = 0.1
TEXTURE_SCALE = 2 * 0.2357


# -- torch reference -------------------------------------------------------------------------------------------

def _sqrt_float32(x: torch.Tensor) -> torch.Tensor:
    """IEEE float32 square root, correctly rounded like dlib's sqrtps. torch.sqrt on CPU is not (it misrounds
    about 0.7% of float32 inputs); the double square root of a float32, rounded to float32, always is."""
    return torch.sqrt(x.double()).float()


def _cell_histograms(orient_steps: torch.Tensor, weight_steps: torch.Tensor) -> torch.Tensor:
    """(steps, B, R, C) bins and weights -> (B, R, C, 18): each cell's bins summed over the steps in order."""
    hist = torch.zeros((*orient_steps.shape[1:], 18), dtype=torch.float32, device=orient_steps.device)
    for k in range(orient_steps.shape[0]):
        hist.scatter_add_(3, orient_steps[k].unsqueeze(-1), weight_steps[k].unsqueeze(-1))
    return hist


def _vote_weights(ph: int, pw: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel row y = 1..ph: (vy0, vy1); per column x = 1..pw: (vx0, vx1): dlib's bilinear vote
    fractions, exact dyadic float32 values."""
    yp = ((np.arange(1, ph + 1) + 0.5) / 8.0 - 0.5).astype(np.float32)
    vy0 = (yp - np.floor(yp)).astype(np.float32)
    xp = ((np.arange(1, pw + 1) + 0.5) / 8.0 - 0.5).astype(np.float32)
    vx0 = (xp - np.floor(xp)).astype(np.float32)
    return (np.stack([vy0, (1.0 - vy0).astype(np.float32)], 1),
            np.stack([vx0, (1.0 - vx0).astype(np.float32)], 1))


def _cell_histograms_torch(images, ph, pw, visible, simd_end, grid_h, grid_w, n_cr, n_cc) -> torch.Tensor:
    """fHOG's orientation histograms of cells 0..n_cr-1 x 0..n_cc-1 (dlib's hist[1..][1..]), (B, R, C, 18)."""
    dev = images.device
    n = images.shape[0]
    cell = CELL_SIZE
    img = images[:, :, :ph + 2, :pw + 2].to(torch.int32)
    gx = torch.sub(img[:, :, 1:-1, 2:], img[:, :, 1:-1, :-2])
    gy = torch.sub(img[:, :, 2:, 1:-1], img[:, :, :-2, 1:-1])
    mag = torch.add(torch.mul(gx, gx), torch.mul(gy, gy))  # exact integers
    xs = np.arange(1, pw + 1)
    ys = np.arange(1, ph + 1)
    simd_col = upload(xs[None, :] < simd_end[:, None], dev)[:, None, :]  # (B, 1, pw)
    # The channel with the largest squared gradient. dlib's SIMD columns do select(r > g, r, g) then
    # select(t > b, t, b) (ties go to the later channel); its scalar columns start with red and switch
    # only on a strictly larger value (ties go to the earlier channel).
    red_green = torch.maximum(mag[:, 0], mag[:, 1])
    simd_channel = torch.where(red_green > mag[:, 2], torch.where(mag[:, 0] > mag[:, 1], 0, 1), 2)
    scalar_channel = torch.where(mag[:, 2] > red_green, 2, torch.where(mag[:, 1] > mag[:, 0], 1, 0))
    channel = torch.where(simd_col, simd_channel, scalar_channel).unsqueeze(1)
    grad_x = torch.gather(gx, 1, channel).squeeze(1).float()
    grad_y = torch.gather(gy, 1, channel).squeeze(1).float()
    v = _sqrt_float32(torch.maximum(red_green, mag[:, 2]).float())
    # Orientation: dlib keeps the first of the 18 candidates dot_0, -dot_0, dot_1, -dot_1, ... that is
    # strictly larger than everything before it (and than 0). That is the first o with the largest |dot_o|
    # (of dot_o and -dot_o only one can be positive), bin o or o + 9 by the sign, when the largest is > 0.
    d0 = upload(DIRECTIONS[:, 0], dev)
    d1 = upload(DIRECTIONS[:, 1], dev)
    dots = torch.add(torch.mul(grad_x.unsqueeze(-1), d0), torch.mul(grad_y.unsqueeze(-1), d1))
    magnitude = torch.abs(dots)
    best = torch.amax(magnitude, dim=-1, keepdim=True)
    # The first o reaching the maximum, whatever the backend's tie rule for argmax.
    first = torch.where(magnitude == best, torch.arange(9, device=dev), 9).amin(dim=-1)
    best = best.squeeze(-1)
    negative = torch.gather(dots, -1, first.unsqueeze(-1)).squeeze(-1) < 0
    best_o = torch.where(best > 0, torch.where(negative, first + 9, first), 0)

    # Bilinear vote weights. dlib's SIMD columns compute vy * (vx * v), its scalar columns (vy * vx) * v.
    vy_np, vx_np = _vote_weights(ph, pw)
    vy_t = upload(vy_np, dev)
    vx_t = upload(vx_np, dev)
    valid = upload((ys[None, :, None] < visible[:, 0, None, None]) & (xs[None, None, :] < visible[:, 1, None, None]), dev)
    weights = {}
    for ky in range(2):
        for kx in range(2):
            vy = vy_t[:, ky][None, :, None]
            vx = vx_t[:, kx][None, None, :]
            simd_w = torch.mul(vy, torch.mul(vx, v))
            scalar_w = torch.mul(torch.mul(vy, vx), v)
            w = torch.where(simd_col, simd_w, scalar_w)
            w = torch.where(valid, w, torch.zeros((), device=dev))
            grid = torch.zeros((n, grid_h, grid_w), dtype=torch.float32, device=dev)
            grid[:, 13:13 + ph, 13:13 + pw] = w
            weights[ky, kx] = grid
    orient = torch.zeros((n, grid_h, grid_w), dtype=torch.int64, device=dev)
    orient[:, 13:13 + ph, 13:13 + pw] = best_o

    # Cell i (dlib's padded index i + 1) sums, in raster order, pixel rows 8i-4 .. 8i+11 (weights vy0 for
    # the first 8, vy1 for the last 8) and likewise columns; adding in that order reproduces dlib's float32
    # sums exactly. The 256 block offsets (dy, dx) in raster order, each as one (B, cells, cells) slice.
    orient_steps, weight_steps = [], []
    for dy in range(16):
        rows = slice(cell + dy, cell + dy + cell * n_cr, cell)
        for dx in range(16):
            cols = slice(cell + dx, cell + dx + cell * n_cc, cell)
            orient_steps.append(orient[:, rows, cols])
            weight_steps.append(weights[dy // 8, dx // 8][:, rows, cols])
    return _cell_histograms(torch.stack(orient_steps), torch.stack(weight_steps))


def _fhog_features_torch(hist: torch.Tensor, hog: np.ndarray, planes: torch.Tensor, offset: tuple[int, int]
                         ) -> None:
    """fHOG's block normalisation and 31 features from the cell histograms (B, R, C, 18), written into
    ``planes`` (zeros) at ``offset``; each image's cells beyond its HOG size stay 0."""
    dev = hist.device
    both = torch.add(hist[..., :9], hist[..., 9:])
    sq = torch.mul(both, both)
    norm = sq[..., 0]
    for o in range(1, 9):
        norm = torch.add(norm, sq[..., o])

    hr, hc = int(hog[:, 0].max()), int(hog[:, 1].max())
    eps = upload(np.array(BLOCK_EPSILON, dtype=np.float32), dev)
    tenth = upload(np.array(NORM_SCALE, dtype=np.float32), dev)
    nn_lanes, n_lanes = [], []
    for dy, dx in LANE_OFFSETS:
        z1 = norm[:, dy:dy + hr, dx:dx + hc]
        z2 = norm[:, dy:dy + hr, dx + 1:dx + 1 + hc]
        z3 = norm[:, dy + 1:dy + 1 + hr, dx:dx + hc]
        z4 = norm[:, dy + 1:dy + 1 + hr, dx + 1:dx + 1 + hc]
        s = torch.add(torch.add(torch.add(torch.add(z1, z2), z3), z4), eps)
        nn = torch.mul(_sqrt_float32(s), float(np.float32(TRUNCATION)))
        nn_lanes.append(nn)
        n_lanes.append(torch.div(tenth, nn))
    nn4 = torch.stack(nn_lanes, 0).unsqueeze(-1)  # (4, B, hr, hc, 1)
    n4 = torch.stack(n_lanes, 0).unsqueeze(-1)
    cell_hist = hist[:, 1:1 + hr, 1:1 + hc, :]    # dlib's hist[y+2][x+2]
    h_sens = torch.mul(torch.minimum(cell_hist.unsqueeze(0), nn4), n4)  # (4, B, hr, hc, 18)
    sens = torch.add(torch.add(h_sens[0], h_sens[1]), torch.add(h_sens[2], h_sens[3]))  # dpps order
    unsigned = torch.add(cell_hist[..., :9], cell_hist[..., 9:])
    h_ins = torch.mul(torch.minimum(unsigned.unsqueeze(0), nn4), n4)
    insens = torch.add(torch.add(h_ins[0], h_ins[1]), torch.add(h_ins[2], h_ins[3]))
    texture = torch.add(torch.add(h_sens[..., 0], h_sens[..., 1]), h_sens[..., 2])
    for o in range(3, 18, 3):
        texture = torch.add(texture, torch.add(torch.add(h_sens[..., o], h_sens[..., o + 1]), h_sens[..., o + 2]))
    texture = torch.mul(texture, float(np.float32(TEXTURE_SCALE)))  # (4, B, hr, hc)
    feats = torch.cat([sens, insens, texture.permute(1, 2, 3, 0)], dim=-1)  # (B, hr, hc, 31)
    inside = upload((np.arange(hr)[None, :, None] < hog[:, 0, None, None])
                    & (np.arange(hc)[None, None, :] < hog[:, 1, None, None]), dev)
    feats = torch.where(inside.unsqueeze(-1), feats, torch.zeros((), device=dev))
    off_r, off_c = offset
    planes[:, :, off_r:off_r + hr, off_c:off_c + hc] = feats.permute(0, 3, 1, 2)
