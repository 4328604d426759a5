"""dlib's fHOG (``extract_fhog_features``, cell 8, 31 planes) of a batch of RGB images, bit for bit as dlib
(dlib-bin 20.0.1: AVX, no FMA).

Per pixel the gradient of the colour channel with the largest magnitude (ties resolved differently in dlib's
8-wide SIMD columns and its scalar right-edge columns, followed here), orientation snapped to 18 directions,
bilinear votes into cells summed in raster order, block energies, truncation at TRUNCATION, the 4-lane sums
in SSE4.1 ``dpps`` order. Square roots are correctly rounded (``torch.sqrt`` on CPU is not: see
``_sqrt_float32``). Every arithmetic step of the torch reference is a separate eager operation, so each product
is rounded to float32 before the addition that uses it, as in dlib; the Triton kernels (compiled with
``enable_fp_fusion=False``) do the same operations in the same order. Order in this module: constants, torch
reference, kernels, launchers, the kernels' probe, the public ``fhog_planes``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device import upload, upload_many
from .formats import CELL_SIZE, NUM_PLANES
from ..kernel_check import tl, triton, use_kernels
from .pyramid import TAIL_BAND

__all__ = ["DIRECTIONS", "LANE_OFFSETS", "BLOCK_EPSILON", "TRUNCATION", "NORM_SCALE", "TEXTURE_SCALE", "FhogLayout",
           "fhog_layout", "fhog_planes", "check_fhog_kernels"]

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
_FHOG_BLOCK = 128  # pixels or cells per program of the kernels below
_CELL_BLOCK = 128  # cells per program of _cell_hist_kernel (one per thread: BLOCK // 32 warps); 64, 256: same


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


# -- Triton kernels ------------------------------------------------------------------------------------------

# Shape arguments are not specialised (do_not_specialize): photos of every size would otherwise compile new
# variants (divisible by 16 or not, per argument) for many calls after the first.
if triton is not None:

    # DIRECTIONS as constants of the kernels (float32 values, exact as Python floats).
    _DIRECTIONS_C = tl.constexpr(tuple(float(v) for v in DIRECTIONS.ravel()))

    @triton.jit(do_not_specialize=["height", "width", "grid_h", "grid_w", "ph", "pw"])
    def _orient_mag_kernel(img_ptr, info_ptr, orient_ptr, mag_ptr, height, width, grid_h, grid_w, ph, pw,
                           BLOCK: tl.constexpr):
        # One program per (grid row Y >= 8, block of grid columns X, image): pixel (y, x) = (Y - 12, X - 12)'s
        # orientation bin (uint8) and gradient magnitude v (float32; 0 for pixels that do not vote, whose bin is
        # then 0), _cell_histograms_torch's arithmetic, for every grid position that _cell_hist_kernel reads of
        # the image (rows and columns < 8 * (its cells + 2)): no grid needs clearing first. The grids store position
        # (Y, X) at Y * grid_w + (X % 8) * (grid_w / 8) + X // 8 (grid_w is a multiple of 8): the columns of one
        # phase X % 8 lie together, so that the histogram kernel's lanes (cells 8 columns apart) load
        # consecutive addresses. Image info (int32, 5 per image): visible rows, visible columns, simd_end,
        # cell rows, cell columns.
        Y = tl.program_id(0) + 8
        X = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(2)
        y = Y - 12
        x = X - 12
        info = info_ptr + 5 * b
        stored = (X < 8 * (tl.load(info + 4) + 2)) & (Y < 8 * (tl.load(info + 3) + 2))
        valid = stored & (y >= 1) & (y <= ph) & (y < tl.load(info)) & (x >= 1) & (x <= pw) & (x < tl.load(info + 1))
        simd = x < tl.load(info + 2)
        plane = height * width  # pixels that do not vote (padding of smaller photos) are not read
        px = img_ptr + b.to(tl.int64) * 3 * plane + (y * width + x)
        gx0 = tl.load(px + 1, mask=valid, other=0).to(tl.int32) - tl.load(px - 1, mask=valid, other=0).to(tl.int32)
        gy0 = (tl.load(px + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px - width, mask=valid, other=0).to(tl.int32))
        px1 = px + plane
        gx1 = tl.load(px1 + 1, mask=valid, other=0).to(tl.int32) - tl.load(px1 - 1, mask=valid, other=0).to(tl.int32)
        gy1 = (tl.load(px1 + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px1 - width, mask=valid, other=0).to(tl.int32))
        px2 = px1 + plane
        gx2 = tl.load(px2 + 1, mask=valid, other=0).to(tl.int32) - tl.load(px2 - 1, mask=valid, other=0).to(tl.int32)
        gy2 = (tl.load(px2 + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px2 - width, mask=valid, other=0).to(tl.int32))
        m0 = gx0 * gx0 + gy0 * gy0
        m1 = gx1 * gx1 + gy1 * gy1
        m2 = gx2 * gx2 + gy2 * gy2
        red_green = tl.maximum(m0, m1)
        # SIMD columns: ties go to the later channel.
        s_gx = tl.where(red_green > m2, tl.where(m0 > m1, gx0, gx1), gx2)
        s_gy = tl.where(red_green > m2, tl.where(m0 > m1, gy0, gy1), gy2)
        # Scalar columns: ties go to the earlier channel.
        c_gx = tl.where(m2 > red_green, gx2, tl.where(m1 > m0, gx1, gx0))
        c_gy = tl.where(m2 > red_green, gy2, tl.where(m1 > m0, gy1, gy0))
        gx = tl.where(simd, s_gx, c_gx).to(tl.float32)
        gy = tl.where(simd, s_gy, c_gy).to(tl.float32)
        v = tl.sqrt_rn(tl.maximum(red_green, m2).to(tl.float32))  # 0 where nothing was read
        best = tl.zeros([BLOCK], dtype=tl.float32)
        bin_ = tl.zeros([BLOCK], dtype=tl.int32)
        for o in tl.static_range(9):
            dot = gx * _DIRECTIONS_C[2 * o] + gy * _DIRECTIONS_C[2 * o + 1]
            size = tl.abs(dot)
            better = size > best
            best = tl.where(better, size, best)
            bin_ = tl.where(better, tl.where(dot > 0, o, o + 9), bin_)
        at = b.to(tl.int64) * grid_h * grid_w + (Y * grid_w + (X & 7) * (grid_w >> 3) + (X >> 3))
        tl.store(orient_ptr + at, bin_.to(tl.uint8), mask=stored)
        tl.store(mag_ptr + at, v, mask=stored)

    @triton.jit(do_not_specialize=["n_cr", "n_cc", "grid_h", "grid_w", "n_cells"])
    def _cell_hist_kernel(orient_ptr, mag_ptr, hist_ptr, info_ptr, n_cr, n_cc, grid_h, grid_w, n_cells,
                          BLOCK: tl.constexpr):
        # One lane per cell, its 18 bins in registers: the cell's 16x16 pixel block (_orient_mag_kernel's grids)
        # in raster order, each pixel's vote added to every bin, +0.0 to the bins other than its own (which
        # leaves their sums unchanged: the weights are >= 0). The vote weight of block offset (dy, dx) is
        # _cell_histograms_torch's, whose factors vy, vx depend on dy, dx only: pixel y = 8i + dy - 4 has
        # vy0 = ((dy % 8) + 0.5) / 8, and rows dy < 8 weigh by vy0, the others by 1 - vy0 = (15.5 - dy) / 8
        # (exact dyadic float32 values; likewise for x). SIMD columns x < simd_end compute vy * (vx * v),
        # scalar ones (vy * vx) * v. Cells beyond the image's own (padding of smaller photos) are not stored.
        cell = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = cell < n_cells
        cell = tl.minimum(cell, n_cells - 1)  # dead lanes load (what they load is not stored)
        b = cell // (n_cr * n_cc)
        i = (cell // n_cc) % n_cr
        j = cell % n_cc
        info = info_ptr + 5 * b
        live = inside & (i < tl.load(info + 3)) & (j < tl.load(info + 4))
        simd_dx = tl.load(info + 2) - 8 * j + 4  # offset dx is a SIMD column if dx < simd_dx
        # Grid position (8 (i + 1) + dy, 8 (j + 1) + dx), stored at row * grid_w + (dx % 8) * (grid_w / 8)
        # + j + 1 + dx // 8.
        start = b.to(tl.int64) * grid_h * grid_w + ((8 * (i + 1)) * grid_w + j + 1)
        o_at = orient_ptr + start
        v_at = mag_ptr + start
        phase = grid_w >> 3
        acc = ()
        for k in tl.static_range(18):
            acc = acc + (tl.zeros([BLOCK], dtype=tl.float32),)
        for dy in range(16):
            vy = tl.where(dy < 8, dy + 0.5, 15.5 - dy) * 0.125
            o_row = o_at + dy * grid_w
            v_row = v_at + dy * grid_w
            for dx in tl.static_range(16):
                vx = ((dx + 0.5) if dx < 8 else (15.5 - dx)) * 0.125
                o = tl.load(o_row + (dx % 8) * phase + dx // 8).to(tl.int32)
                v = tl.load(v_row + (dx % 8) * phase + dx // 8)
                w = tl.where(dx < simd_dx, vy * (vx * v), (vy * vx) * v)
                votes = ()
                for k in tl.static_range(18):
                    votes = votes + (tl.where(o == k, acc[k] + w, acc[k]),)
                acc = votes
        out = hist_ptr + cell.to(tl.int64) * 18
        for k in tl.static_range(18):
            tl.store(out + k, acc[k], mask=live)

    @triton.jit(do_not_specialize=["n_cells"])
    def _block_energy_kernel(hist_ptr, norm_ptr, n_cells, BLOCK: tl.constexpr):
        # Per cell: the sum over o = 0..8 of (hist[o] + hist[o + 9])^2, in that order.
        cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_cells
        base = hist_ptr + cell * 18
        norm = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(9):
            both = tl.load(base + o, mask=live, other=0.0) + tl.load(base + o + 9, mask=live, other=0.0)
            norm = norm + both * both
        tl.store(norm_ptr + cell, norm, mask=live)

    @triton.jit
    def _lane_normaliser(norm_ptr, at, n_cc, live, EPSILON: tl.constexpr, TRUNC: tl.constexpr,
                         SCALE: tl.constexpr):
        # One of the four 2x2 blocks around a cell: (truncation level, 1 / its block energy's norm * 0.1).
        z1 = tl.load(norm_ptr + at, mask=live, other=1.0)
        z2 = tl.load(norm_ptr + at + 1, mask=live, other=1.0)
        z3 = tl.load(norm_ptr + at + n_cc, mask=live, other=1.0)
        z4 = tl.load(norm_ptr + at + n_cc + 1, mask=live, other=1.0)
        nn = tl.sqrt_rn((((z1 + z2) + z3) + z4) + EPSILON) * TRUNC
        return nn, tl.div_rn(tl.zeros_like(nn) + SCALE, nn)

    @triton.jit(do_not_specialize=["hr", "hc", "n_cr", "n_cc", "plane_h", "plane_w", "off_r", "off_c", "n_out"])
    def _features_kernel(hist_ptr, norm_ptr, hog_ptr, planes_ptr, hr, hc, n_cr, n_cc, plane_h, plane_w, off_r,
                         off_c, n_out, NUM_PLANES: tl.constexpr, EPSILON: tl.constexpr, TRUNC: tl.constexpr,
                         SCALE: tl.constexpr, TEXTURE: tl.constexpr, BLOCK: tl.constexpr):
        # One lane per feature cell (b, r, c): the 31 features of _fhog's torch path, in its order of float
        # operations, written to the planes at (off_r + r, off_c + c); zeros outside the image's HOG size.
        cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_out
        c = cell % hc
        r = (cell // hc) % hr
        b = cell // (hr * hc)
        inside = live & (r < tl.load(hog_ptr + 2 * b, mask=live, other=0)) & (
            c < tl.load(hog_ptr + 2 * b + 1, mask=live, other=0))
        at = b * n_cr * n_cc + r * n_cc + c
        # The four lanes (dy, dx) = (1, 1), (0, 1), (1, 0), (0, 0) (LANE_OFFSETS).
        nn0, n0 = _lane_normaliser(norm_ptr, at + n_cc + 1, n_cc, live, EPSILON, TRUNC, SCALE)
        nn1, n1 = _lane_normaliser(norm_ptr, at + 1, n_cc, live, EPSILON, TRUNC, SCALE)
        nn2, n2 = _lane_normaliser(norm_ptr, at + n_cc, n_cc, live, EPSILON, TRUNC, SCALE)
        nn3, n3 = _lane_normaliser(norm_ptr, at, n_cc, live, EPSILON, TRUNC, SCALE)
        h = hist_ptr + (at + n_cc + 1) * 18  # dlib's hist[y + 2][x + 2]: this port's cell (r + 1, c + 1)
        out = planes_ptr + b * NUM_PLANES * plane_h * plane_w + (off_r + r) * plane_w + (off_c + c)
        plane = plane_h * plane_w
        t0 = tl.zeros([BLOCK], dtype=tl.float32)
        t1 = tl.zeros([BLOCK], dtype=tl.float32)
        t2 = tl.zeros([BLOCK], dtype=tl.float32)
        t3 = tl.zeros([BLOCK], dtype=tl.float32)
        for g in tl.static_range(6):  # texture: ((h[3g] + h[3g+1]) + h[3g+2]) added group after group
            for k in tl.static_range(3):
                v = tl.load(h + 3 * g + k, mask=live, other=0.0)
                s0 = tl.minimum(v, nn0) * n0
                s1 = tl.minimum(v, nn1) * n1
                s2 = tl.minimum(v, nn2) * n2
                s3 = tl.minimum(v, nn3) * n3
                tl.store(out + (3 * g + k) * plane, tl.where(inside, (s0 + s1) + (s2 + s3), 0.0), mask=live)
                if k == 0:
                    g0, g1, g2, g3 = s0, s1, s2, s3
                else:
                    g0, g1, g2, g3 = g0 + s0, g1 + s1, g2 + s2, g3 + s3
            t0, t1, t2, t3 = t0 + g0, t1 + g1, t2 + g2, t3 + g3
        for o in tl.static_range(9):
            u = tl.load(h + o, mask=live, other=0.0) + tl.load(h + o + 9, mask=live, other=0.0)
            s0 = tl.minimum(u, nn0) * n0
            s1 = tl.minimum(u, nn1) * n1
            s2 = tl.minimum(u, nn2) * n2
            s3 = tl.minimum(u, nn3) * n3
            tl.store(out + (18 + o) * plane, tl.where(inside, (s0 + s1) + (s2 + s3), 0.0), mask=live)
        tl.store(out + 27 * plane, tl.where(inside, t0 * TEXTURE, 0.0), mask=live)
        tl.store(out + 28 * plane, tl.where(inside, t1 * TEXTURE, 0.0), mask=live)
        tl.store(out + 29 * plane, tl.where(inside, t2 * TEXTURE, 0.0), mask=live)
        tl.store(out + 30 * plane, tl.where(inside, t3 * TEXTURE, 0.0), mask=live)


# -- launchers ---------------------------------------------------------------------------------------------

def _cell_histograms_triton(images, layout: "FhogLayout", info_t: torch.Tensor) -> torch.Tensor:
    """_cell_histograms_torch with two Triton kernels: same result bit for bit in each image's own cells (the
    only ones read). ``info_t``: the layout's ``info`` on the device."""
    dev = images.device
    n, _, height, width = images.shape
    images = images.contiguous()
    n_cr, n_cc, grid_h, grid_w = layout.n_cr, layout.n_cc, layout.grid_h, layout.grid_w
    ph, pw = layout.interior(height, width)
    n_cells = n * n_cr * n_cc
    hist = torch.empty((n, n_cr, n_cc, 18), dtype=torch.float32, device=dev)
    orient = torch.empty((n, grid_h, grid_w), dtype=torch.uint8, device=dev)
    mag = torch.empty((n, grid_h, grid_w), dtype=torch.float32, device=dev)
    _orient_mag_kernel[(grid_h - 8, triton.cdiv(grid_w, _FHOG_BLOCK), n)](
        images, info_t, orient, mag, height, width, grid_h, grid_w, ph, pw, BLOCK=_FHOG_BLOCK,
        enable_fp_fusion=False)
    _cell_hist_kernel[(triton.cdiv(n_cells, _CELL_BLOCK),)](
        orient, mag, hist, info_t, n_cr, n_cc, grid_h, grid_w, n_cells, BLOCK=_CELL_BLOCK,
        num_warps=_CELL_BLOCK // 32, enable_fp_fusion=False)
    return hist


def _fhog_features_triton(hist: torch.Tensor, hog: np.ndarray, planes: torch.Tensor, offset: tuple[int, int],
                          hog_t: torch.Tensor) -> None:
    """_fhog_features_torch as two Triton kernels: same arguments, same planes bit for bit. ``hog_t``: ``hog``
    (int64) on the device."""
    n, n_cr, n_cc, _ = hist.shape
    hr, hc = int(hog[:, 0].max()), int(hog[:, 1].max())
    hist = hist.contiguous()
    norm = torch.empty((n, n_cr, n_cc), dtype=torch.float32, device=hist.device)
    cells = n * n_cr * n_cc
    _block_energy_kernel[(triton.cdiv(cells, _FHOG_BLOCK),)](hist, norm, cells, BLOCK=_FHOG_BLOCK,
                                                                enable_fp_fusion=False)
    n_out = n * hr * hc
    _features_kernel[(triton.cdiv(n_out, _FHOG_BLOCK),)](
        hist, norm, hog_t, planes, hr, hc, n_cr, n_cc, planes.shape[2],
        planes.shape[3], offset[0], offset[1], n_out, NUM_PLANES=NUM_PLANES, EPSILON=BLOCK_EPSILON, TRUNC=TRUNCATION,
        SCALE=NORM_SCALE, TEXTURE=TEXTURE_SCALE, BLOCK=_FHOG_BLOCK, enable_fp_fusion=False)


# -- the layout (host tables) ------------------------------------------------------------------------------

@dataclass
class FhogLayout:
    """fhog_planes' sizes and tables for a batch of image sizes, computed on the host (fhog_layout): per image its
    cells (rows, cols), HOG size ``hog`` (0 where it has no HOG cell), pixels that vote (``visible``), first scalar
    pixel column ``simd_end``; the batch's planes (plane_h, plane_w), cell grid (n_cr, n_cc) and pixel grid
    (grid_h, grid_w); ``info`` (B, 5) int32 and ``hog`` (B, 2) are the kernels' tables (``kernel_tables``)."""

    cells: np.ndarray
    hog: np.ndarray
    visible: np.ndarray
    simd_end: np.ndarray
    plane_h: int
    plane_w: int
    n_cr: int
    n_cc: int
    offset: tuple[int, int]

    @property
    def grid_h(self) -> int:
        return CELL_SIZE * (self.n_cr + 2)

    @property
    def grid_w(self) -> int:
        return CELL_SIZE * (self.n_cc + 2)

    @property
    def empty(self) -> bool:
        return int(self.hog.max()) == 0

    def interior(self, height: int, width: int) -> tuple[int, int]:
        """Interior pixels 1..ph, 1..pw of images (B, 3, height, width) that the cell grid reads."""
        return min(height - 2, self.grid_h - 13), min(width - 2, self.grid_w - 13)

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(info (B, 5) int32: visible rows and columns, simd_end, cell rows and columns; hog (B, 2) int64)."""
        info = np.concatenate([self.visible, self.simd_end[:, None], self.cells], axis=1).astype(np.int32)
        return info, self.hog.astype(np.int64)


def fhog_layout(sizes: list[tuple[int, int]], fhog_pad: tuple[int, int]) -> FhogLayout:
    """fhog_planes' sizes and tables for images of ``sizes`` (numpy only: no device work)."""
    cell = CELL_SIZE
    # dlib: (int)(rows / (float)cell_size + 0.5), in float32 (exact: a division by 8, then + 0.5), truncated.
    cells = (np.asarray(sizes, dtype=np.float32).reshape(-1, 2) / np.float32(cell) + np.float32(0.5)).astype(np.int64)
    hog = np.maximum(cells - 2, 0)
    hog[(hog == 0).any(axis=1)] = 0
    visible = np.minimum(cells * cell, np.asarray(sizes, dtype=np.int64).reshape(-1, 2)) - 1  # pixels 1..visible-1 vote
    pad_r, pad_c = fhog_pad
    plane_h = int(hog[:, 0].max()) + pad_r - 1
    # One band's width more on the right: the scalar right-edge filter loop reads up to 8 + fw - 1 columns
    # past each image's first scalar column.
    plane_w = int(hog[:, 1].max()) + pad_c - 1 + TAIL_BAND
    simd_end = 1 + 8 * ((visible[:, 1] - 1) // 8)  # dlib's 8-wide pixel columns are x < simd_end
    return FhogLayout(cells, hog, visible, simd_end, plane_h, plane_w, int(cells[:, 0].max()),
                      int(cells[:, 1].max()), ((pad_r - 1) // 2, (pad_c - 1) // 2))


# -- the probe and the public function ---------------------------------------------------------------------

def check_fhog_kernels(device, fhog_pad: tuple[int, int] = (10, 10)) -> str | None:
    """The fHOG kernels against the torch path on ``device``: quantised random images (many equal gradients:
    every tie rule is exercised), two sizes in a batch; ``fhog_pad``: the detector's filter size. None when
    equal, else what differs."""
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 4, (h, w, 3)) * 60).astype(np.uint8) for h, w in ((93, 141), (130, 77))]
    images[1][40:90, 10:60] = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    sizes = [im.shape[:2] for im in images]
    batch = torch.zeros((2, 3, 130, 141), dtype=torch.uint8)
    for k, im in enumerate(images):
        batch[k, :, :im.shape[0], :im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
    batch = batch.to(device)
    want, _ = fhog_planes(batch, sizes, fhog_pad, use_triton=False)
    got, _ = fhog_planes(batch, sizes, fhog_pad, use_triton=True)
    if not torch.equal(want, got):
        return f"fHOG planes differ in {int((want != got).sum())} values"
    return None


def fhog_planes(images: torch.Tensor, sizes: list[tuple[int, int]], fhog_pad: tuple[int, int],
                use_triton: bool | None = None, layout: FhogLayout | None = None,
                device_tables: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, np.ndarray]:
    """extract_fhog_features(cell 8, filter padding fhog_pad) for each image; returns the planes
    (B, 31, Hp, Wp + band) float32 with each image's features at offset (pad-1)//2 and zeros around, and per
    image (hog rows, hog cols). Images (B, 3, H, W) uint8, image b's valid part sizes[b] (an image of size
    (0, 0) has no HOG cell: nothing of it is computed). ``use_triton``: see models/kernel_check.py (None: the
    kernels on CUDA once checked there). ``layout``: fhog_layout(sizes, fhog_pad), made beforehand;
    ``device_tables``: its kernel_tables() already on the device (else they travel in one copy); ``out``: a
    zero-filled tensor of the planes' shape to write them into (e.g. a view of one buffer for many levels)."""
    dev = images.device
    layout = layout or fhog_layout(sizes, fhog_pad)
    n = images.shape[0]
    hog = layout.hog
    shape = (n, NUM_PLANES, layout.plane_h, layout.plane_w)
    planes = torch.zeros(shape, dtype=torch.float32, device=dev) if out is None else out
    if tuple(planes.shape) != shape:
        raise ValueError(f"out has shape {tuple(planes.shape)}, the planes {shape}")
    if layout.empty:
        return planes, hog
    if use_kernels("fhog", dev, use_triton, check_fhog_kernels):
        info_t, hog_t = device_tables or upload_many(layout.kernel_tables(), dev)
        hist = _cell_histograms_triton(images, layout, info_t)
        _fhog_features_triton(hist, hog, planes, layout.offset, hog_t)
    else:
        ph, pw = layout.interior(images.shape[2], images.shape[3])
        hist = _cell_histograms_torch(images, ph, pw, layout.visible, layout.simd_end, layout.grid_h, layout.grid_w,
                                      layout.n_cr, layout.n_cc)
        _fhog_features_torch(hist, hog, planes, layout.offset)
    return planes, hog
