"""models.alignment.landmarks.ShapePredictor against dlib.shape_predictor itself, per face, on real photographs.

The reference is dlib: every comparison runs dlib on the same image and box and requires the same integers.
Faces come from the test photographs and from 220 seeded variants (tests/helpers/face_variants.py: scale, rotation,
crops and canvases, JPEG, mirror), with dlib's own detector boxes, jittered boxes, and boxes anywhere
(partly outside the image). Synthetic models (written in dlib's format and loaded by dlib too) put points
and feature pixels exactly on half pixels, where rounding decides, and exercise other tree shapes.
"""
from __future__ import annotations

import importlib.util
import json
import os

import dlib
import numpy as np
import pytest
import torch

from models.alignment.formats import DlibFormatError, DlibReader, DlibWriter
from models.alignment.landmarks import ShapePredictor
from models.alignment.landmarks_model import (
    ShapePredictorModel,
    parse_shape_predictor,
    random_model,
    read_shape_predictor,
    serialize_shape_predictor,
    shape_predictor_68_path,
)
from helpers.face_variants import face_variants, load_photo_array, original_photos
from helpers.paths import REPO_ROOT
from models.alignment.ffhq_geometry import eye_roll_degrees

VARIANTS = 220


@pytest.fixture(scope="module")
def model_path():
    path = shape_predictor_68_path()
    assert os.path.getsize(path) > 90e6, "the 68-point model of face-recognition-models is expected here"
    return path


@pytest.fixture(scope="module")
def predictor(model_path):
    return ShapePredictor(model_path, device="cpu")


@pytest.fixture(scope="module")
def dlib_predictor(model_path):
    return dlib.shape_predictor(model_path)


def dlib_points(dlib_sp, image: np.ndarray, box) -> np.ndarray:
    shape = dlib_sp(image, dlib.rectangle(*(int(v) for v in box)))
    return np.array([(shape.part(k).x, shape.part(k).y) for k in range(shape.num_parts)], dtype=np.int64)


def compare_with_dlib(sp: ShapePredictor, dlib_sp, images, boxes, names) -> list[str]:
    """Predicts all boxes of all images in one batch; returns a line per box that differs from dlib."""
    points = sp.predict(images, boxes)
    failures = []
    for image, image_boxes, image_points, name in zip(images, boxes, points, names):
        assert image_points.shape == (len(image_boxes), sp.num_parts, 2) and image_points.dtype == np.int64
        for box, mine in zip(image_boxes, image_points):
            ref = dlib_points(dlib_sp, image, box)
            if not np.array_equal(mine, ref):
                wrong = np.flatnonzero((mine != ref).any(axis=1))
                failures.append(f"{name} box {tuple(box)}: parts {wrong.tolist()} differ by up to "
                                f"{int(np.abs(mine - ref).max())} px")
    return failures


def test_68_point_model_parsed(predictor):
    m = predictor.model
    assert (m.num_parts, m.num_cascades, m.num_trees, m.num_splits, m.num_pixels) == (68, 15, 500, 15, 500)
    # The mean shape is normalised to the box: the jaw spans most of its width, the chin reaches just below.
    x, y = m.initial_shape[0::2], m.initial_shape[1::2]
    assert 0 <= x.min() and x.max() <= 1 and x.max() - x.min() > 0.8
    assert 0 <= y.min() and 1 < y.max() < 1.2


def test_photos_and_variants_equal_dlib(predictor, dlib_predictor):
    detector = dlib.get_frontal_face_detector()
    rng = np.random.default_rng(2024)
    variants = [v for v in original_photos()] + face_variants(VARIANTS, seed=0)
    images, boxes, names = [], [], []
    detected = 0
    for v in variants:
        h, w = v.image.shape[:2]
        image_boxes = []
        for r in detector(v.image, 0):
            box = np.array([r.left(), r.top(), r.right(), r.bottom()])
            detected += 1
            size = box[2] - box[0]
            image_boxes.append(box)
            image_boxes.append(box + rng.integers(-3, 4, 4))                     # a few pixels off
            image_boxes.append(box + rng.integers(-size // 5, size // 5 + 1, 4))  # a sloppy box
        # A box anywhere, of any size, possibly reaching out of the image (outside pixels read as 0).
        x0, y0 = rng.integers(-w // 4, w, 1)[0], rng.integers(-h // 4, h, 1)[0]
        side = int(rng.integers(20, max(h, w)))
        image_boxes.append(np.array([x0, y0, x0 + side, y0 + side + int(rng.integers(-10, 11))]))
        images.append(v.image)
        boxes.append([tuple(int(c) for c in b) for b in image_boxes])
        names.append(f"{v.name} [{v.recipe}]")
    assert detected >= 80, f"only {detected} faces detected: the variants no longer exercise real faces"
    failures = compare_with_dlib(predictor, dlib_predictor, images, boxes, names)
    assert not failures, f"{len(failures)} of {sum(map(len, boxes))} boxes differ from dlib:\n" + \
        "\n".join(failures[:20])


def _half_pixel_model(parts: int, rng) -> ShapePredictorModel:
    """One cascade whose leaves are zero: the result is the mean shape mapped into the box. The mean shape's
    coordinates are binary fractions, so that on most boxes some points land exactly on half pixels."""
    fractions = rng.integers(-16, 33, (parts, 2)) / 16
    return ShapePredictorModel(
        initial_shape=fractions.reshape(-1).astype(np.float32),
        split_index1=np.zeros((1, 1, 1), dtype=np.int64), split_index2=np.zeros((1, 1, 1), dtype=np.int64),
        split_threshold=np.zeros((1, 1, 1), dtype=np.float32),
        leaf_values=np.zeros((1, 1, 2, 2 * parts), dtype=np.float32),
        anchor_index=np.zeros((1, 1), dtype=np.int64), anchor_delta=np.zeros((1, 1, 2), dtype=np.float32))


def _random_boxes(rng, count: int) -> list[tuple[int, int, int, int]]:
    boxes = []
    for i in range(count):
        left, top = (int(v) for v in rng.integers(-300, 300, 2))
        # Every third box small, empty or inverted (right < left: dlib maps into it all the same).
        w, h = (int(v) for v in (rng.integers(-20, 20, 2) if i % 3 == 0 else rng.integers(0, 400, 2)))
        boxes.append((left, top, left + w, top + h))
    return boxes


def test_half_pixel_points_round_like_dlib(tmp_path):
    # dlib maps into the box with an affine transform fitted through an SVD-based pseudo-inverse, which is
    # off in the last bits: a point exactly between two pixels rounds as those bits say, not as exact
    # arithmetic (x * (right - left) + left) would.
    rng = np.random.default_rng(5)
    model = _half_pixel_model(200, rng)
    path = tmp_path / "half_pixels.dat"
    path.write_bytes(serialize_shape_predictor(model))
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    boxes = _random_boxes(rng, 1500)
    failures = compare_with_dlib(ShapePredictor(str(path)), dlib.shape_predictor(str(path)), [image], [boxes],
                                 ["zeros"])
    assert not failures, "\n".join(failures[:20])
    # The case is a real one: exact arithmetic would round differently from dlib on most of these boxes.
    mean = model.initial_shape.reshape(-1, 2).astype(np.float64)
    exact_differs = 0
    for box in boxes[:200]:
        l, t, r, b = box
        exact = np.floor(mean * [r - l, b - t] + [l, t] + 0.5)
        exact_differs += not np.array_equal(exact, dlib_points(dlib.shape_predictor(str(path)), image, box))
    assert exact_differs > 100


def test_half_pixel_feature_pixels_like_dlib(tmp_path):
    # Feature pixels on half pixels of a noise image: each tree compares two of them and moves one
    # coordinate by half the box when the first is brighter, so every rounding shows in the result.
    rng = np.random.default_rng(6)
    parts, pixels = 12, 40
    coords = 2 * parts
    leaf_values = np.zeros((1, coords, 2, coords), dtype=np.float32)
    leaf_values[0, np.arange(coords), 0, np.arange(coords)] = 0.5
    model = ShapePredictorModel(
        initial_shape=(rng.integers(0, 17, coords) / 16).astype(np.float32),
        split_index1=rng.integers(0, pixels, (1, coords, 1)), split_index2=rng.integers(0, pixels, (1, coords, 1)),
        split_threshold=np.zeros((1, coords, 1), dtype=np.float32),
        leaf_values=leaf_values,
        anchor_index=rng.integers(0, parts, (1, pixels)),
        anchor_delta=(rng.integers(-4, 5, (1, pixels, 2)) / 32).astype(np.float32))
    path = tmp_path / "half_pixel_features.dat"
    path.write_bytes(serialize_shape_predictor(model))
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    boxes = [(int(l), int(t), int(l + s), int(t + s)) for l, t, s in
             zip(rng.integers(-20, 60, 600), rng.integers(-20, 50, 600), rng.integers(1, 60, 600))]
    failures = compare_with_dlib(ShapePredictor(str(path)), dlib.shape_predictor(str(path)), [image], [boxes],
                                 ["noise"])
    assert not failures, "\n".join(failures[:20])


def test_other_tree_shapes_equal_dlib(tmp_path):
    # Random trees of another shape (3 cascades, depth 3, 7 parts), written in dlib's format: dlib and the
    # port must agree on real faces, and the file must parse back to the same arrays.
    model = random_model(cascades=3, trees=40, depth=3, pixels=60, parts=7, seed=3)
    path = tmp_path / "random.dat"
    path.write_bytes(serialize_shape_predictor(model))
    parsed = read_shape_predictor(str(path))
    for field in ShapePredictorModel.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(parsed, field), getattr(model, field), err_msg=field)
    photos = [v.image for v in original_photos()[:2]]
    rng = np.random.default_rng(7)
    boxes = [[(int(x), int(y), int(x + s), int(y + s)) for x, y, s in
              zip(rng.integers(0, 300, 30), rng.integers(0, 300, 30), rng.integers(40, 250, 30))]
             for _ in photos]
    failures = compare_with_dlib(ShapePredictor(str(path)), dlib.shape_predictor(str(path)), photos, boxes,
                                 ["astronaut", "grace_hopper"])
    assert not failures, "\n".join(failures[:20])


def test_torch_path_is_batch_independent(predictor):
    # Faces are predicted together; each face's result must not depend on the others in the batch.
    image = original_photos()[1].image
    boxes = [(150, 130, 380, 360), (160, 140, 390, 370), (-40, -30, 200, 210)]
    together = predictor.predict([image, image], [boxes, boxes[:1]])
    for i, box in enumerate(boxes):
        alone = predictor.predict([image], [[box]])[0][0]
        np.testing.assert_array_equal(together[0][i], alone)
    np.testing.assert_array_equal(together[1][0], together[0][0])


def test_images_as_tensors_and_empty_inputs(predictor):
    image = original_photos()[0].image
    box = (150, 60, 300, 210)
    from_numpy = predictor.predict([image], [[box]])[0]
    from_tensor = predictor.predict([torch.from_numpy(image.copy())], [[box]])[0]
    np.testing.assert_array_equal(from_numpy, from_tensor)
    # A mirrored view (negative strides) is the mirrored photo.
    mirrored = image[:, ::-1]
    np.testing.assert_array_equal(predictor.predict([mirrored], [[box]])[0],
                                  predictor.predict([mirrored.copy()], [[box]])[0])
    empty = predictor.predict([image, image], [[], [box]])
    assert empty[0].shape == (0, 68, 2) and empty[1].shape == (1, 68, 2)
    assert predictor.predict([], []) == []


def test_bad_inputs_are_named(predictor):
    image = original_photos()[0].image
    with pytest.raises(ValueError, match="2 images but 1 lists of boxes"):
        predictor.predict([image, image], [[(0, 0, 10, 10)]])
    with pytest.raises(ValueError, match="image 1 must be an HxWx3 uint8 array"):
        predictor.predict([image, image.astype(np.float32)], [[], []])
    with pytest.raises(ValueError, match="image 0 must be an HxWx3 uint8 array"):
        predictor.predict([image[:, :, 0]], [[]])
    with pytest.raises(ValueError, match="image 0 must be a numpy array or a torch tensor, got list"):
        predictor.predict([image.tolist()], [[]])
    with pytest.raises(ValueError, match=r"boxes of image 0 must be \(left, top, right, bottom\)"):
        predictor.predict([image], [[(0, 0, 10)]])
    with pytest.raises(ValueError, match="integer coordinates"):
        predictor.predict([image], [[(0.5, 0, 10, 10)]])
    with pytest.raises(ValueError, match="use_triton needs a CUDA device"):
        ShapePredictor.from_model(predictor.model, device="cpu", use_triton=True)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        ShapePredictor.from_model(predictor.model, device="cpu", cuda_graphs=True)


# -- malformed model files: a clear error naming the file and the offset, and nothing read beyond ----------

@pytest.fixture(scope="module")
def small_model_bytes():
    return serialize_shape_predictor(random_model(cascades=2, trees=6, depth=2, pixels=10, parts=5, seed=9))


def test_truncated_model_file(small_model_bytes):
    n = len(small_model_bytes)
    for cut in sorted({1, 2, 5, n // 3, n // 2, n - 40, n - 3, n - 1}):
        with pytest.raises(DlibFormatError, match=rf"^small\.dat: .*truncated.* at byte offset \d+") as e:
            parse_shape_predictor(small_model_bytes[:cut], "small.dat")
        offset = int(str(e.value).split("at byte offset ")[1].split()[0])
        assert offset <= cut


def _first_tree_offsets(data: bytes):
    # Offsets of the number of cascades and of the first tree's number of splits.
    r = DlibReader(data, "x")
    r.read_int()
    r.read_matrix()
    cascades_at = r.offset
    r.read_ints(2)
    return cascades_at, r.offset


def test_altered_model_files(small_model_bytes):
    data = bytearray(small_model_bytes)
    # Wrong version.
    bad = bytes([0x01, 0x02]) + bytes(data[2:])
    with pytest.raises(DlibFormatError, match="shape_predictor version is 2, expected 1 at byte offset 0"):
        parse_shape_predictor(bad, "v.dat")
    cascades_at, splits_at = _first_tree_offsets(bytes(data))
    # A control byte with reserved bits set in the first tree.
    bad = bytearray(data)
    bad[splits_at] |= 0x40
    with pytest.raises(DlibFormatError, match=rf"c\.dat: invalid control byte .* at byte offset {splits_at}"):
        parse_shape_predictor(bytes(bad), "c.dat")
    # The second cascade declares another number of trees than the first: found where it is. A cascade is
    # its tree count and 6 trees of 102 integers (3 splits of 4, 4 leaves of 2 + 2 * 10, 2 lengths).
    r = DlibReader(bytes(data), "x")
    r.offset = cascades_at
    r.read_ints(1 + 1 + 6 * 102)
    second = r.offset
    assert r.read_int() == 6
    bad = bytearray(data)
    bad[second + 1] = 7
    with pytest.raises(DlibFormatError, match=rf"s\.dat: forest structure differs from the first tree: found 7 "
                                              rf"where 6 was expected at byte offset {second}"):
        parse_shape_predictor(bytes(bad), "s.dat")
    # The same byte made an invalid control byte: found by the vectorised pass over all forests.
    bad = bytearray(data)
    bad[second] |= 0x20
    with pytest.raises(DlibFormatError, match=rf"d\.dat: invalid control byte 0x21 .* at byte offset {second}"):
        parse_shape_predictor(bytes(bad), "d.dat")
    # Trailing bytes after a complete model.
    with pytest.raises(DlibFormatError, match=rf"unexpected data after the shape predictor at byte offset "
                                              rf"{len(data)}"):
        parse_shape_predictor(bytes(data) + b"\x01\x00", "t.dat")


def test_split_index_out_of_range_refused():
    model = random_model(cascades=1, trees=2, depth=1, pixels=4, parts=3, seed=1)
    # An index beyond the cascade's feature pixels (dlib would read out of bounds).
    bad = ShapePredictorModel(**{**model.__dict__, "split_index1": np.full_like(model.split_index1, 4)})
    with pytest.raises(ValueError, match="split_index1 must index the 4 feature pixels"):
        bad.validate()
    doubles = ShapePredictorModel(**{**model.__dict__, "leaf_values": model.leaf_values.astype(np.float64)})
    with pytest.raises(ValueError, match="leaf_values must be float32, got float64"):
        ShapePredictor.from_model(doubles)
    # The same defect in a file is a DlibFormatError naming the file.
    w = DlibWriter()
    w.write_int(1)
    w.write_matrix(model.initial_shape)
    w.write_ints([1, 2])
    for t in range(2):
        w.write_ints([1, 9, 0])
        w.write_float(0.0)
        w.write_int(2)
        w.write_matrix(model.leaf_values[0, t, 0])
        w.write_matrix(model.leaf_values[0, t, 1])
    w.write_ints([1, 4])
    w.write_ints(model.anchor_index[0])
    w.write_ints([1, 4])
    w.write_floats(model.anchor_delta[0])
    with pytest.raises(DlibFormatError, match="idx.dat: split_index1 must index the 4 feature pixels"):
        parse_shape_predictor(w.getvalue(), "idx.dat")


@pytest.fixture(scope="module")
def raw_bench():
    """benchmarks/bench_pipeline_raw_gpu.py (not a package), whose face-like random trees are tested here."""
    path = os.path.join(REPO_ROOT, "benchmarks", "bench_pipeline_raw_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_pipeline_raw_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_mean_face_is_dlibs_frame(raw_bench, dlib_predictor, model_path):
    """The benchmark's mean face: its boxes are dlib's detections and its landmarks dlib's on them, and
    normalised by those boxes it lies near the real model's own initial shape (the mean face dlib trained)."""
    detector = dlib.get_frontal_face_detector()
    saved = json.load(open(raw_bench.LANDMARKS_FILE))
    for name, box in raw_bench.FACE_BOXES.items():
        image = load_photo_array(name)
        best = max(zip(*detector.run(image, 0, 0.0)[:2]), key=lambda d: d[1])[0]
        assert (best.left(), best.top(), best.right(), best.bottom()) == box, name
        np.testing.assert_array_equal(dlib_points(dlib_predictor, image, box), np.asarray(saved[name]), err_msg=name)
    mean = raw_bench.mean_face_shape()
    real = read_shape_predictor(model_path).initial_shape.reshape(-1, 2)
    assert mean.shape == (68, 2) and mean.dtype == np.float32
    error = np.abs(mean - real)
    assert error.max() < 0.15 and error.mean() < 0.06, (error.max(), error.mean())
    assert abs(eye_roll_degrees(mean)) < 2.0


def test_face_like_random_trees_predict_a_level_face_in_every_box(raw_bench, tmp_path):
    """Random trees with the mean face as initial shape and tiny leaves: in any box (on faces, elsewhere, on
    noise, partly outside), points within a pixel or two of the mean face placed in the box, eyes level (no
    upright re-prediction); the trees are the default random model's (the same work per face), and dlib
    loads the file and predicts the same integers."""
    model = raw_bench.face_like_model(seed=0)
    default = random_model(seed=0)
    for field in ("split_index1", "split_index2", "split_threshold", "anchor_index", "anchor_delta"):
        np.testing.assert_array_equal(getattr(model, field), getattr(default, field), err_msg=field)
    np.testing.assert_allclose(model.leaf_values, default.leaf_values * (raw_bench.FACE_LEAF_SCALE / 1e-3),
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(model.initial_shape, raw_bench.mean_face_shape().reshape(-1))

    rng = np.random.default_rng(5)
    images = [v.image for v in original_photos()] + [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)]
    boxes = [[(int(x), int(y), int(x + s - 1), int(y + s - 1)) for x, y, s in
              zip(rng.integers(-30, 250, 12), rng.integers(-30, 200, 12), rng.integers(40, 260, 12))]
             for _ in images]
    boxes[0].append(raw_bench.FACE_BOXES["astronaut.jpg"])
    points = ShapePredictor.from_model(model).predict(images, boxes)
    mean = raw_bench.mean_face_shape().astype(np.float64)
    for image_boxes, image_points in zip(boxes, points):
        for (left, top, right, bottom), p in zip(image_boxes, image_points):
            placed = (left, top) + mean * (right - left, bottom - top)
            assert np.abs(p - placed).max() <= 1.0 + 0.01 * (right - left), (left, top, right, bottom)
            assert abs(eye_roll_degrees(p)) < 10.0, (left, top, right, bottom)
    path = tmp_path / "face_like.dat"
    path.write_bytes(serialize_shape_predictor(model))
    failures = compare_with_dlib(ShapePredictor(str(path)), dlib.shape_predictor(str(path)), images[:2], boxes[:2],
                                 ["astronaut", "grace_hopper"])
    assert not failures, "\n".join(failures[:20])
