"""The alignment steps after detection, batched over a chunk's faces, against their per-face forms.

The predictor, the upright regions of rolled faces and the FFHQ crop read the chunk's photos where the upload left
them (views of one buffer, models/alignment/flat_views.py), and their host numbers (crop plans, rolls, the
regions' way back to the photo) are computed for all faces at once with array operations. Each is checked here,
bit for bit, against the per-face computation it replaces (itself checked against dlib and Pillow in
test_landmarks.py, test_ffhq_crop_torch.py and tests/pipeline/test_align*.py); and DeviceAligner.align is held to
one host read of landmarks per prediction round and one of the crops.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.face_variants import load_photo
from models.alignment import ffhq_crop, ffhq_padding
from models.alignment.ffhq_crop import (crop_faces, eye_rolls_degrees, regions_to_source, upright_region,
                                        upright_regions)
from models.alignment.ffhq_padding import _blur_pad, blur_pad_faces
from models.alignment.ffhq_geometry import (UPRIGHT_ABOVE, eye_roll_degrees, ffhq_quads, plan_crop, plan_crops,
                                            upright_geometry)
from models.alignment.flat_views import shared_flat, views_of
from models.alignment.landmarks import ShapePredictor, grey_levels
from models.alignment.resample import ImageSources, affine_sample_regions
from pipeline.config import AlignConfig
from pipeline.device_align import DeviceAligner


def _flat_photos(rng, sizes):
    """Random photos of (w, h) ``sizes`` as views of one flat buffer, and as separate numpy copies."""
    total = sum(w * h for w, h in sizes)
    flat = torch.from_numpy(rng.integers(0, 256, (total, 3), dtype=np.uint8))
    starts = np.concatenate([[0], np.cumsum([w * h for w, h in sizes])[:-1]]).tolist()
    views = views_of(flat, starts, sizes)
    return flat, starts, views, [v.numpy().copy() for v in views]


def _face_landmarks(centre, eye_distance, roll_degrees):
    """68 points whose eyes and mouth corners (all the FFHQ geometry reads) make a face at ``centre``."""
    t = np.radians(roll_degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    lm = np.zeros((68, 2))
    eye = np.array([[-0.55, -0.05], [-0.5, -0.1], [-0.4, -0.1], [-0.35, -0.05], [-0.4, 0.0], [-0.5, 0.0]])
    lm[36:42] = eye
    lm[42:48] = eye * [-1, 1]
    lm[48], lm[54] = (-0.4, 0.9), (0.4, 0.9)
    return (lm * eye_distance / 0.9) @ rot.T + centre


def test_shared_flat_recognises_views_of_one_buffer_only():
    rng = np.random.default_rng(0)
    flat, starts, views, copies = _flat_photos(rng, [(7, 5), (3, 4), (6, 6)])
    found = shared_flat([views[2], views[0], views[2]])
    assert found is not None and found[0].data_ptr() == flat.data_ptr()
    assert found[1] == [starts[2], starts[0], starts[2]] and found[2] == [(6, 6), (7, 5), (6, 6)]
    assert shared_flat(copies) is None
    assert shared_flat([views[0], torch.from_numpy(copies[1])]) is None
    assert shared_flat([views[0][:, 1:]]) is None  # not contiguous
    assert shared_flat([flat.view(-1)[1:1 + 3 * 4].view(2, 2, 3)]) is None  # not at a whole pixel


def test_plan_crops_equal_plan_crop_per_face():
    """Every number of plan_crops equals plan_crop's, on faces inside, across edges, outside, shrunk or not."""
    rng = np.random.default_rng(1)
    n = 600
    sizes = np.stack([rng.integers(40, 2000, n), rng.integers(40, 2000, n)], 1)
    lm = np.stack([_face_landmarks(rng.uniform(-0.3, 1.3, 2) * s, np.exp(rng.uniform(np.log(3), np.log(700))),
                                   rng.uniform(-40, 40)) for s in sizes])
    quads, qsizes = ffhq_quads(lm)
    for output_size, transform_size, padding in ((256, 1024, True), (64, 256, True), (128, 512, False)):
        plans = plan_crops(quads, qsizes, sizes, output_size, transform_size, padding)
        kinds = {"shrunk": 0, "padded": 0, "plain": 0}
        for i in range(n):
            want = plan_crop(quads[i], qsizes[i], tuple(int(v) for v in sizes[i]), output_size, transform_size,
                             padding)
            got = plans[i]
            assert (got.shrink, got.shrink_box, got.crop, got.pad, got.blur_sigma, got.transform) == \
                (want.shrink, want.shrink_box, want.crop, want.pad, want.blur_sigma, want.transform), i
            assert np.array_equal(got.quad, want.quad) and got.canvas_size == want.canvas_size, i
            assert plans.padded[i] == want.padded and tuple(plans.canvas_size[i]) == want.canvas_size, i
            kinds["shrunk"] += want.shrink > 1
            kinds["padded"] += want.padded
            kinds["plain"] += want.shrink == 1 and not want.padded
        # every path of plan_crop is compared
        assert kinds["shrunk"] >= 20 and kinds["plain"] >= 20 and (kinds["padded"] >= 20) == padding, kinds


def test_rolls_and_the_way_back_equal_the_per_face_ones():
    rng = np.random.default_rng(2)
    lm = rng.normal(0, 50, (200, 68, 2)) + rng.uniform(0, 1000, (200, 1, 2))
    assert eye_rolls_degrees(lm) == [eye_roll_degrees(p) for p in lm]
    geometry = [upright_geometry(tuple(rng.uniform(0, 400, 2)) + tuple(rng.uniform(420, 900, 2)),
                                 rng.uniform(-60, 60)) for _ in range(50)]
    points = rng.integers(0, 500, (50, 68, 2))
    back = regions_to_source(geometry, points)
    for g, p, b in zip(geometry, points, back):
        assert np.array_equal(g.to_source(p), b)


@pytest.mark.parametrize("max_pixels", [1 << 22, 997])
def test_upright_regions_equal_upright_region_per_face(max_pixels, monkeypatch):
    """All faces' regions sampled in one pass (in pieces of max_pixels pixels, across regions' ends) equal each
    face's own upright_region; photos that are separate tensors are copied into one buffer first."""
    rng = np.random.default_rng(3)
    flat, _, views, copies = _flat_photos(rng, [(90, 70), (61, 83), (120, 40)])
    faces = [(0, (10, 12, 50, 52), 17.0), (1, (5, 20, 45, 60), -33.5), (0, (60, 30, 95, 65), 80.0),
             (2, (-10, -5, 30, 35), 12.25), (1, (20, 10, 41, 31), 0.0)]
    geometry = [upright_geometry(box, roll) for _, box, roll in faces]
    real = affine_sample_regions
    monkeypatch.setattr(ffhq_crop, "affine_sample_regions",
                        lambda *a: real(*a, max_pixels=max_pixels))
    for photos in (views, [torch.from_numpy(c) for c in copies]):
        regions = upright_regions([photos[i] for i, _, _ in faces], geometry)
        assert shared_flat(regions) is not None  # one buffer: the predictor reads it in place
        for (i, box, roll), g, region in zip(faces, geometry, regions):
            want, want_box, _ = upright_region(photos[i], box, roll)
            assert torch.equal(region, want) and g.box == want_box


def test_affine_sample_regions_of_nothing():
    flat = torch.zeros((4, 3), dtype=torch.uint8)
    src = ImageSources(*torch.zeros((4, 0), dtype=torch.int64))
    assert affine_sample_regions(flat, src, np.zeros((0, 6)), np.zeros((0, 2))).shape == (0, 3)


@pytest.fixture(scope="module")
def small_predictor():
    return ShapePredictor.random(cascades=3, trees=40, seed=5, leaf_scale=0.05)


def test_predictor_reads_views_of_one_buffer_in_place(small_predictor, monkeypatch):
    """Photos that are views of one buffer are read where they lie (no copy into a buffer of the predictor's
    own), with the same points as the same photos as numpy arrays; the RGB entry equals the grey-level one."""
    rng = np.random.default_rng(4)
    flat, starts, views, copies = _flat_photos(rng, [(90, 70), (61, 83), (120, 40)])
    boxes = [[(10, 12, 50, 52), (-20, 30, 40, 90)], [], [(60, 2, 100, 38)]]
    want = small_predictor.predict(copies, boxes)
    monkeypatch.setattr(small_predictor, "_stack_images", lambda *a: pytest.fail("the views were copied"))
    got = small_predictor.predict(views, boxes)
    assert [g.shape for g in got] == [(2, 68, 2), (0, 68, 2), (1, 68, 2)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    table = torch.tensor([[10, 12, 50, 52, starts[0], 90, 70], [60, 2, 100, 38, starts[2], 120, 40]])
    assert torch.equal(small_predictor.predict_rgb_faces(flat, table),
                       small_predictor.predict_faces(grey_levels(flat), table))
    np.testing.assert_array_equal(got[2][0], small_predictor.predict_rgb_faces(flat, table)[1].numpy())


def test_crop_faces_reads_views_of_one_buffer_in_place(monkeypatch):
    """crop_faces on views of one buffer (plain, padded and shrunk faces) reads them in place and equals its crops
    of the same photos as numpy arrays."""
    rng = np.random.default_rng(6)
    flat, _, views, copies = _flat_photos(rng, [(300, 240), (260, 320)])
    lm = np.stack([_face_landmarks((150, 120), 25, 5), _face_landmarks((20, 30), 30, -10),
                   _face_landmarks((130, 160), 90, 20), _face_landmarks((200, 100), 20, 0)])
    index = [0, 0, 1, 1]
    plans = plan_crops(*ffhq_quads(lm), [(300, 240), (300, 240), (260, 320), (260, 320)], 64, 128)
    assert plans.padded.any() and (plans.shrink > 1).any() and (~plans.padded & (plans.shrink == 1)).any()
    want = crop_faces(copies, index, lm, 64, 128, faces_per_chunk=3)
    monkeypatch.setattr(ffhq_crop, "photos_to_device", lambda *a: pytest.fail("the views were copied"))
    assert torch.equal(crop_faces(views, index, lm, 64, 128, faces_per_chunk=3), want)
    assert torch.equal(crop_faces(views, index, None, 64, 128, faces_per_chunk=3, plans=plans), want)
    assert torch.equal(crop_faces(views, index, None, 64, 128, plans=[plans[i] for i in range(4)]), want)


class _HostReads:
    """Counts Tensor.cpu / .item / .tolist calls per part of DeviceAligner.align (its on_part hook)."""

    def __init__(self, monkeypatch):
        self.n, self.mark, self.parts = 0, 0, {}
        for name in ("cpu", "item", "tolist"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, **k: self.add() or _real(t, *a, **k))

    def add(self) -> None:
        self.n += 1

    def on_part(self, part: str, wall: float, cpu: float) -> None:
        self.parts[part] = self.parts.get(part, 0) + self.n - self.mark
        self.mark = self.n


def test_device_aligner_reads_back_once_per_round(monkeypatch):
    """After detection, DeviceAligner.align reads the device once per prediction round (the first prediction of
    all faces, then one per upright round of the rolled faces) and once for the crops; it also times each part
    in wall and CPU time."""
    aligner = DeviceAligner.build(AlignConfig(backend="torch"), "cpu")
    head = load_photo("astronaut.jpg").crop((110, 20, 330, 240))
    photos = [np.asarray(head.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(90, 90, 90)))
              for angle in (0, 24, -30)]
    calls = []
    real_predict = aligner.predictor.predict
    monkeypatch.setattr(aligner.predictor, "predict", lambda images, boxes: calls.append(len(images))
                        or real_predict(images, boxes))
    reads = _HostReads(monkeypatch)
    aligner.on_part = reads.on_part
    aligned = aligner.align(photos)
    assert [len(f) for f in aligned] == [1, 1, 1]
    assert abs(eye_roll_degrees(aligned[0][0].landmarks)) < UPRIGHT_ABOVE < abs(eye_roll_degrees(
        aligned[1][0].landmarks))
    assert len(calls) >= 2, calls  # the rolled faces made at least one upright round
    assert reads.parts["landmarks"] == len(calls) and reads.parts["crop"] == 1, (reads.parts, calls)
    assert all(aligner.part_cpu_seconds[p] > 0 for p in ("stage", "upload", "detect", "landmarks", "crop"))


@pytest.mark.parametrize("bucketed", [False, True])
def test_padding_in_groups_equals_padding_face_by_face(bucketed, monkeypatch):
    """blur_pad_faces (faces of several sizes and pads, grouped into dense canvases) against _blur_pad face by face:
    the same canvases, but for the blur's FFT length (the group's), within a grey level on a few values."""
    rng = np.random.default_rng(8)
    flat = torch.from_numpy(rng.integers(0, 256, (400 * 300, 3), dtype=np.uint8))
    photo = flat.view(300, 400, 3)
    crops = np.array([(50, 40), (61, 73), (120, 90), (13, 9), (200, 150), (1, 5)])
    corners = np.array([(0, 0), (300, 200), (10, 100), (380, 290), (150, 20), (0, 295)])
    pads = np.array([(12, 30, 5, 7), (40, 40, 40, 40), (3, 1, 1, 60), (20, 20, 20, 20), (60, 45, 60, 45),
                     (4, 3, 2, 1)])
    sigmas = np.array([1.3, 2.7, 0.0, 0.6, 4.1, 0.3])
    monkeypatch.setattr(ffhq_padding, "GROUP_PIXELS", 60_000)  # several groups, one face alone
    groups = blur_pad_faces(flat, corners[:, 1] * 400 + corners[:, 0], np.full(6, 400), crops, pads, sigmas,
                            bucketed=bucketed)
    assert len(groups) >= 3 and sorted(np.concatenate([g.faces for g in groups]).tolist()) == list(range(6))
    differ = 0
    for g in groups:
        for b, i in enumerate(g.faces):
            (x, y), (w, h) = corners[i], crops[i]
            want = _blur_pad(photo[y:y + h, x:x + w], tuple(pads[i]), float(sigmas[i]))
            H, W = want.shape[:2]
            got = g.canvases[b, :H, :W]
            assert torch.equal(g.flat[g.base[b]:g.base[b] + H * g.stride[b]].view(H, g.stride[b], 3)[:, :W], got)
            diff = (got.int() - want.int()).abs()
            assert int(diff.max()) <= 1, i
            differ += int((diff > 0).sum())
            if sigmas[i] == 0:  # no blur: nothing of the FFT, the same arithmetic throughout
                assert torch.equal(got, want), i
    assert differ <= 1e-3 * sum(int(np.prod(crops[i] + pads[i, :2] + pads[i, 2:])) * 3 for i in range(6)), differ
