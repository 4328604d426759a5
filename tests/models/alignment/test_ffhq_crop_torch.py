"""models.alignment.ffhq_crop (the FFHQ crop in torch, batched) against pipeline.align's Pillow path, per face,
and models.alignment.resample's Lanczos resize against Pillow's.

Faces: dlib landmarks of the test photographs, of seeded variants (tests/helpers/face_variants.py: scaled, rotated,
mirrored, moved to edges or onto canvases, JPEG) and of the photographs cut so that the face touches an edge
(the same landmarks shifted: the crop then needs the blur padding). Every face is cropped by both paths from
the same landmarks; the torch crops come from one batched call over all photos. Run with ``-s`` to see the
per-face table. ``FFHQ_CROP_TEST_DEVICE=cuda`` runs the torch side on a GPU (default: cpu).
"""
from __future__ import annotations

import math
import os

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.face_variants import face_variants, load_photo, load_photo_array
from helpers.nvlabs_ffhq import nvlabs_quad
from models.alignment.ffhq_crop import _channel_median, _gaussian_blur, crop_faces, upright_landmarks
from models.alignment.ffhq_geometry import eye_roll_degrees, ffhq_quad, ffhq_quads, plan_crop
from models.alignment.resample import VERTICAL_FIRST_RULE, lanczos_resize
from pipeline.align import ffhq_crop, get_aligner
from pipeline.blur import gaussian_blur_hw

MAX_GREY_DIFF = 2
MIN_PSNR_DB = 50.0
QUAD_TOLERANCE = 0.005  # of the quad's side
VARIANT_COUNT = 40
UPRIGHT_ABOVE = 10.0
DEVICE = torch.device(os.environ.get("FFHQ_CROP_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def aligner():
    return get_aligner()


def _best_face_box(aligner, image):
    found = aligner.detect(image)
    return max(found, key=lambda d: d[1])[0] if found else None


def _edge_cuts(image: np.ndarray, landmarks: np.ndarray):
    """The photo cut so that the face lies across each edge in turn (left, top, right, bottom), with the
    landmarks in the cut's pixels."""
    h, w = image.shape[:2]
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    cuts = {
        "left": (cx, 0, w, h),
        "top": (0, cy, w, h),
        "right": (0, 0, int(x1), h),
        "bottom": (0, 0, w, int(y1)),
    }
    for side, (a, b, c, d) in cuts.items():
        yield side, np.ascontiguousarray(image[b:d, a:c]), landmarks - (a, b)


@pytest.fixture(scope="module")
def faces(aligner):
    """(name, photo, landmarks) of every face used by the crop comparisons."""
    out = []
    for file_name in ("astronaut.jpg", "grace_hopper.jpg"):
        photo = load_photo_array(file_name)
        box = _best_face_box(aligner, photo)
        landmarks = aligner.landmarks(photo, box)
        out.append((file_name, photo, landmarks))
        for side, cut, shifted in _edge_cuts(photo, landmarks):
            out.append((f"{file_name}:cut-{side}", cut, shifted))
    for variant in face_variants(VARIANT_COUNT, seed=0):
        box = _best_face_box(aligner, variant.image)
        if box is not None:
            out.append((f"{variant.name} {variant.recipe}", variant.image, aligner.landmarks(variant.image, box)))
    assert len(out) >= 20, f"only {len(out)} faces found"
    return out


def _max_diff_and_psnr(ours: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    diff = ours.astype(np.int32) - ref.astype(np.int32)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return int(np.abs(diff).max()), (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))


def _lanczos_cases():
    """Seeded (photo, output size, box) triples: the test photos and tall/wide cuts of them, downscaled by
    1 to 5 per axis, half of them with a fractional box (the shrink step's)."""
    rng = np.random.default_rng(7)
    photos = [load_photo_array(f) for f in ("astronaut.jpg", "grace_hopper.jpg")]
    for i in range(24):
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 4, h + 1)), int(rng.integers(w // 4, w + 1))
        photo = np.ascontiguousarray(photo[:ch, w - cw :])
        box = (0.0, 0.0, float(cw), float(ch))
        if i % 4 >= 2:
            x0, y0 = rng.uniform(0, cw / 4), rng.uniform(0, ch / 4)
            box = (x0, y0, rng.uniform(x0 + cw / 2, cw), rng.uniform(y0 + ch / 2, ch))
        size = (max(int((box[2] - box[0]) / rng.uniform(1, 5)), 1), max(int((box[3] - box[1]) / rng.uniform(1, 5)), 1))
        yield photo, size, box


def test_lanczos_resize_matches_pillow():
    vertical_first = 0
    for photo, size, box in _lanczos_cases():
        ref = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS, box=box))
        ours = lanczos_resize(torch.from_numpy(photo.copy()).to(DEVICE)[None], size, box)[0].cpu().numpy()
        diff = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (photo.shape, size, box, diff.max())
        h, w = photo.shape[:2]
        vertical_first += VERTICAL_FIRST_RULE and h - size[1] > max(0, (w - size[0]) * 2)
    # With Pillow 13 both pass orders occur among the cases.
    assert vertical_first >= 3 or not VERTICAL_FIRST_RULE, vertical_first


def _kthvalue_median(flat: torch.Tensor) -> torch.Tensor:
    """The padding step's median as it was computed before the sort: torch.kthvalue per middle value."""
    n = flat.shape[0]
    if n % 2:
        return flat.kthvalue(n // 2 + 1, dim=0).values
    return (flat.kthvalue(n // 2, dim=0).values + flat.kthvalue(n // 2 + 1, dim=0).values) / 2


@pytest.mark.parametrize("n", [1, 2, 7, 10, 4_095, 65_536, 250_001, 250_000])
def test_channel_median_is_numpys_bit_for_bit(n):
    """The sort-based median equals np.median per channel and the kthvalue median, to the bit, on float32
    values of the padding step's kinds: grey levels (many repeats), blurred levels and wide random floats."""
    rng = np.random.default_rng(n)
    for values in (rng.integers(0, 256, (n, 3)).astype(np.float32),
                   (rng.integers(0, 40, (n, 3)) + rng.integers(0, 4, (n, 3)) * np.float32(0.3)).astype(np.float32),
                   rng.normal(128, 60, (n, 3)).astype(np.float32)):
        flat = torch.from_numpy(values).to(DEVICE)
        ours = _channel_median(flat).cpu().numpy()
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), _kthvalue_median(flat).cpu().numpy().view(np.uint32))
        np.testing.assert_array_equal(ours.view(np.uint32), np.median(values, axis=0).view(np.uint32))


@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("shape,sigma", [((181, 233, 3), 3.1), ((37, 300, 3), 9.7), ((257, 129, 3), 15.2),
                                         ((5, 9, 3), 0.8)])
def test_padding_blur_is_scipys(shape, sigma, bucketed):
    """The padding step's blur, with fast FFT lengths (CPUs) and with lengths and batches rounded up to
    powers of two (what CUDA devices run, to reuse cuFFT plans), is scipy.ndimage.gaussian_filter(f, [s, s, 0])
    (mode 'reflect', truncate 4; pipeline.blur's float64 FFT) to float32 rounding, on sizes whose lines reflect
    several times (the 5 x 9 image: radius 3)."""
    f = np.random.default_rng(len(shape) + shape[0]).integers(0, 256, shape).astype(np.float32)
    ours = _gaussian_blur(torch.from_numpy(f).to(DEVICE), sigma, bucketed=bucketed).cpu().numpy()
    assert ours.shape == f.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, gaussian_blur_hw(f, sigma, exact=True), rtol=0, atol=2e-3)


def test_quads_are_the_reference_quads(faces):
    """The one FFHQ geometry (batched, and one face at a time as the Pillow path calls it) gives the reference
    script's floats exactly."""
    landmarks = np.stack([lm for _, _, lm in faces])
    quads, sides = ffhq_quads(landmarks)
    for (name, _, lm), quad, side in zip(faces, quads, sides):
        ref_quad, ref_side = nvlabs_quad(lm)
        assert np.array_equal(quad, ref_quad) and side == ref_side, name
        one_quad, one_side = ffhq_quad(lm)
        assert np.array_equal(one_quad, ref_quad) and one_side == ref_side, name


@pytest.mark.parametrize(
    "output_size,transform_size",
    [
        (256, 1024),  # the pipeline's setting: no face here is large enough to be shrunk
        (64, 256),  # small output: most faces take the Lanczos shrink before the crop
    ],
)
def test_batched_crops_match_pillow_per_face(faces, output_size, transform_size):
    photos = [photo for _, photo, _ in faces]
    landmarks = np.stack([lm for _, _, lm in faces])
    # Photos as torch tensors and numpy arrays mixed; chunks smaller than the batch and not dividing it.
    photos = [torch.from_numpy(p.copy()) if i % 2 else p for i, p in enumerate(photos)]
    ours = crop_faces(photos, list(range(len(faces))), landmarks, output_size, transform_size, device=DEVICE,
                      faces_per_chunk=3)
    assert ours.shape == (len(faces), output_size, output_size, 3) and ours.dtype == torch.uint8
    ours = ours.cpu()

    quads, sides = ffhq_quads(landmarks)
    rows, failures, kinds = [], [], {"plain": 0, "padded": 0, "shrunk": 0}
    for i, (name, photo, lm) in enumerate(faces):
        plan = plan_crop(quads[i], sides[i], (photo.shape[1], photo.shape[0]), output_size, transform_size)
        kinds["padded"] += plan.padded
        kinds["shrunk"] += plan.shrink > 1
        kinds["plain"] += not plan.padded and plan.shrink == 1
        ref = ffhq_crop(photo, lm, output_size, transform_size)
        max_diff, psnr = _max_diff_and_psnr(ours[i].numpy(), ref)
        rows.append((name, plan.shrink, plan.padded, max_diff, psnr))
        if max_diff > MAX_GREY_DIFF or psnr < MIN_PSNR_DB:
            failures.append(rows[-1])
    print(f"\n{'face':70s} shrink padded max_diff PSNR(dB)")
    for name, shrink, padded, max_diff, psnr in rows:
        print(f"{name[:70]:70s} {shrink:6d} {padded!s:6s} {max_diff:8d} {psnr:8.1f}")
    psnrs = [r[4] for r in rows]
    finite = [p for p in psnrs if math.isfinite(p)]
    print(f"{len(rows)} faces {kinds}: max grey diff {max(r[3] for r in rows)}, PSNR min {min(psnrs):.1f} dB, "
          f"mean over {len(finite)} inexact faces {np.mean(finite) if finite else math.inf:.1f} dB, "
          f"{len(rows) - len(finite)} identical")
    assert not failures, failures
    # The comparison covers every path of the procedure.
    assert kinds["padded"] >= 4 and kinds["plain"] >= 2, kinds
    if output_size == 64:
        assert kinds["shrunk"] >= 4, kinds


def test_photo_index_places_each_face(faces):
    # Two faces of one photo and one of another, listed out of order: each crop is its own face's.
    (_, photo_a, lm_a), (_, photo_b, lm_b) = faces[0], faces[1]
    ours = crop_faces([photo_a, photo_b], [1, 0, 0], np.stack([lm_b, lm_a, lm_a + (0, -60)]), 64, 256,
                      device=DEVICE).cpu()
    for crop, photo, lm in zip(ours.numpy(), (photo_b, photo_a, photo_a), (lm_b, lm_a, lm_a + (0, -60))):
        max_diff, psnr = _max_diff_and_psnr(crop, ffhq_crop(photo, lm, 64, 256))
        assert max_diff <= MAX_GREY_DIFF and psnr >= MIN_PSNR_DB
    assert not torch.equal(ours[1], ours[2])


def test_without_padding_outside_the_photo_is_black(faces):
    # enable_padding=False: the quad reaches past the photo's top edge and Pillow fills black there.
    _, photo, lm = faces[0]
    lm = lm + (0, -90)
    ours = crop_faces([photo], [0], lm[None], 128, 512, enable_padding=False, device=DEVICE)[0].cpu().numpy()
    ref = ffhq_crop(photo, lm, 128, 512, enable_padding=False)
    max_diff, psnr = _max_diff_and_psnr(ours, ref)
    assert max_diff <= MAX_GREY_DIFF and psnr >= MIN_PSNR_DB
    assert (ref[:8] == 0).all() and (ref[-8:] != 0).any()


# --------------------------------------------------------------------------------------------------
# Upright re-prediction for rolled faces


def _dlib_predictor(aligner, calls: list):
    """dlib's 68-point predictor as models.alignment.ffhq_crop expects it: (image tensor, box) -> (68, 2). Records the
    image sizes it was called on."""

    def predict(image: torch.Tensor, box) -> np.ndarray:
        array = np.ascontiguousarray(image.cpu().numpy())
        calls.append(array.shape[:2])
        x0, y0, x1, y1 = box
        rect = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)
        return np.array([(p.x, p.y) for p in aligner.predictor(array, rect).parts()], dtype=np.float64)

    return predict


def _rolled_photos():
    for file_name in ("astronaut.jpg", "grace_hopper.jpg"):
        for angle in (-35, -22, -13, 13, 22, 35):
            rotated = load_photo(file_name).rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(90, 90, 90))
            yield f"{file_name} rot{angle:+d}", np.asarray(rotated)
    for variant in face_variants(VARIANT_COUNT, seed=0):
        yield variant.name, variant.image


def test_upright_reprediction_quads_match_cpu_path(aligner):
    rolled = 0
    for name, photo in _rolled_photos():
        box = _best_face_box(aligner, photo)
        if box is None:
            continue
        ref_quad, ref_side = ffhq_quad(aligner.landmarks(photo, box))
        calls = []
        ours = upright_landmarks(torch.from_numpy(photo.copy()).to(DEVICE), box, _dlib_predictor(aligner, calls),
                                 UPRIGHT_ABOVE)
        quad, _ = ffhq_quad(ours)
        error = np.abs(quad - ref_quad).max() / ref_side
        assert error <= QUAD_TOLERANCE, (name, error)
        was_rolled = len(calls) > 1
        # The first prediction is made on the photo; upright ones on regions of their own size.
        assert calls[0] == photo.shape[:2] and all(c != photo.shape[:2] for c in calls[1:]), (name, calls)
        first_roll = eye_roll_degrees(_dlib_predictor(aligner, [])(torch.from_numpy(photo.copy()), box))
        assert was_rolled == (abs(first_roll) > UPRIGHT_ABOVE), (name, first_roll, calls)
        rolled += was_rolled
    assert rolled >= 8, rolled
