"""models.alignment.detector.FrontalFaceDetector against dlib's own frontal face detector, per image.

The reference is dlib: every image is also run through ``dlib.get_frontal_face_detector().run(image,
upsample, adjust_threshold)`` and the port must return the same rectangles, the same filter indices and
scores within 1e-4, in the same order. Images: the test photographs and seeded variants from
tests/helpers/face_variants.py (scale 0.4-2.5, rotation +-35 degrees, crops and canvases, JPEG 30-95, mirror) plus
faceless images. Counts (chosen for runtime, one CPU thread): 200 face variants up to 640 px and 20 faceless
images at upsample 0; 60 face variants up to 400 px and 6 faceless at upsample 1; each for adjust_threshold
0 and -0.5. The stages are also compared on their own: pyramid levels (dlib.pyramid_down), upsampling
(dlib.resize_image) and every fHOG plane at every level, read back from dlib through detector files with a
single unit weight. A model file with altered weights, loaded by dlib and by the port, checks that the port
really computes from the file it reads. (The port is in fact bit-exact: the photographs' scores are
required to be identical, and the variant tests print the largest score difference seen.)
"""
from __future__ import annotations

import os

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from models.alignment.detector import BUNDLED_DETECTOR_FILE, FrontalFaceDetector, float32_at_least
from models.alignment.device import upload_many
from models.alignment.formats import DetectorFileError, DlibReader, encode_float, encode_int, read_detector_file
from models.kernel_check import use_kernels
from models.alignment.pyramid import pyramid_down_size, pyramid_up_size, resize_rgb
from models.alignment.resize_tables import resize_tables
from helpers.face_variants import face_variants, faceless_variants, original_photos

SCORE_TOLERANCE = 1e-4
BORDERLINE = 1e-3      # a differing window is only excused this close to the threshold or to another score
MAX_DIFFERING = 0.01   # fraction of images allowed to differ (each only by borderline windows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The port runs many small tensor operations; on a shared 2-core machine a second intra-op thread only
    # adds synchronisation. Restored for the tests that follow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dlib_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("detector") / "frontal_face_detector.svm")
    dlib.get_frontal_face_detector().save(path)
    return path


@pytest.fixture(scope="module")
def detector(dlib_file):
    return FrontalFaceDetector(device="cpu", path=dlib_file)


@pytest.fixture(scope="module")
def dlib_detector():
    return dlib.get_frontal_face_detector()


def dlib_run(dlib_det, image: np.ndarray, upsample: int, adjust: float):
    rects, scores, filters = dlib_det.run(image, upsample, adjust)
    return [((r.left(), r.top(), r.right(), r.bottom()), float(s), int(f))
            for r, s, f in zip(rects, scores, filters)]


def difference(ours, theirs, adjust: float) -> tuple[str, bool] | None:
    """None when the two lists agree (same boxes, filters and order, scores within SCORE_TOLERANCE);
    otherwise (description, excused): excused when every window that is in one list only has a score
    within BORDERLINE of the threshold or of another detection's score, and the shared ones agree."""
    if len(ours) == len(theirs) and all(
            a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) <= SCORE_TOLERANCE for a, b in zip(ours, theirs)):
        return None
    key_ours = {(d[0], d[2]): d[1] for d in ours}
    key_theirs = {(d[0], d[2]): d[1] for d in theirs}
    shared_agree = all(abs(key_ours[k] - key_theirs[k]) <= SCORE_TOLERANCE for k in key_ours.keys() & key_theirs)
    all_scores = [d[1] for d in ours] + [d[1] for d in theirs]
    lonely = [(k, s) for k, s in list(key_ours.items()) + list(key_theirs.items())
              if (k in key_ours) != (k in key_theirs)]

    def borderline(score: float) -> bool:
        near_threshold = abs(score - adjust) <= BORDERLINE
        near_other = sum(abs(score - other) <= BORDERLINE for other in all_scores) > 1
        return near_threshold or near_other

    # Without lonely windows the lists differ in order only, which scores within tolerance make near-ties.
    excused = shared_agree and all(borderline(s) for _, s in lonely)
    return f"dlib: {theirs}\n    port: {ours}", excused


def compare_with_dlib(detector, dlib_det, variants, upsample: int, adjust: float):
    """Runs all images in one batched call; returns (number of detections, lines for differing images,
    whether all differences are excused, largest score difference over windows found by both)."""
    found = detector.detect([v.image for v in variants], upsample=upsample, adjust_threshold=adjust)
    assert len(found) == len(variants)
    lines, excused_all, n_detections, worst = [], True, 0, 0.0
    for variant, ours in zip(variants, found):
        theirs = dlib_run(dlib_det, variant.image, upsample, adjust)
        n_detections += len(theirs)
        for box, score, filt in ours:
            assert isinstance(score, float) and isinstance(filt, int) and all(isinstance(v, int) for v in box)
        scores_theirs = {(d[0], d[2]): d[1] for d in theirs}
        for box, score, filt in ours:
            if (box, filt) in scores_theirs:
                worst = max(worst, abs(score - scores_theirs[(box, filt)]))
        diff = difference(ours, theirs, adjust)
        if diff is not None:
            text, excused = diff
            excused_all &= excused
            lines.append(f"{variant.name} [{variant.recipe}] {variant.image.shape} upsample={upsample} "
                         f"adjust={adjust} {'(borderline)' if excused else '(NOT borderline)'}\n    {text}")
    return n_detections, lines, excused_all, worst


def assert_equal_to_dlib(detector, dlib_det, variants, upsample, adjust, min_detections) -> float:
    n_detections, lines, excused, worst = compare_with_dlib(detector, dlib_det, variants, upsample, adjust)
    report = "\n".join(lines)
    assert excused and len(lines) <= MAX_DIFFERING * len(variants), \
        f"{len(lines)} of {len(variants)} images differ from dlib:\n{report}"
    print(f"{len(variants)} images, {n_detections} detections, {len(lines)} borderline differences, "
          f"largest score difference {worst:.3g}\n{report}")
    # The comparison must have had something to compare: dlib itself found this many windows.
    assert n_detections >= min_detections, f"dlib found only {n_detections} detections on these images"
    return worst


# -- the model file ----------------------------------------------------------------------------------------

def test_bundled_file_is_what_dlib_writes(dlib_file):
    with open(dlib_file, "rb") as ours_from_dlib, open(BUNDLED_DETECTOR_FILE, "rb") as bundled:
        assert bundled.read() == ours_from_dlib.read()


def test_file_structure_agrees_with_dlib(dlib_file, dlib_detector):
    model = read_detector_file(dlib_file)
    assert model.filters.shape[0] == dlib_detector.num_detectors
    assert (model.window_width, model.window_height) == (dlib_detector.detection_window_width,
                                                         dlib_detector.detection_window_height)
    assert model.filters.shape[1:] == (31, model.window_height // model.cell_size,
                                       model.window_width // model.cell_size)
    # The separable approximation keeps dlib's number of rank-1 terms (dlib.num_separable_filters).
    detector = FrontalFaceDetector(path=dlib_file)
    for f in range(model.filters.shape[0]):
        single = _single_filter_file(dlib_file, f, model)
        # dlib.num_separable_filters takes a simple_object_detector: the detector, a version, an upsampling.
        with open(single, "ab") as out:
            out.write(encode_int(1) + encode_int(0))
        assert detector.num_terms[f] == dlib.num_separable_filters(dlib.simple_object_detector(single))


def _rewrite(path: str, filters: np.ndarray, thresholds: np.ndarray, out: str,
             overlap: tuple[float, float] | None = None) -> str:
    """The detector file with new weight vectors (and overlap thresholds); the rest copied byte for byte."""
    with open(path, "rb") as f:
        data = f.read()
    reader = DlibReader(data, path)
    # Skip to the overlap thresholds: the header is a fixed sequence of values (see the parser).
    for _ in range(11):
        reader.read_int()
    reader.read_floats(1, dtype=np.float64)
    reader.read_int()
    header = data[:reader.offset]
    overlap_bytes = data[reader.offset:]
    reader.read_floats(2, dtype=np.float64)
    overlap_bytes = overlap_bytes[:reader.offset - len(header)]
    if overlap is not None:
        overlap_bytes = encode_float(overlap[0], digits=53) + encode_float(overlap[1], digits=53)
    parts = [header, overlap_bytes, encode_int(filters.shape[0])]
    for w, t in zip(filters, thresholds):
        values = np.concatenate([w.reshape(-1), [t]])
        parts += [encode_int(-values.size), encode_int(-1)] + [encode_float(v, digits=53) for v in values]
    with open(out, "wb") as f:
        f.write(b"".join(parts))
    return out


def _single_filter_file(path: str, f: int, model) -> str:
    out = os.path.join(os.path.dirname(path), f"filter{f}.svm")
    return _rewrite(path, model.filters[f:f + 1], model.thresholds[f:f + 1], out)


def test_port_computes_from_the_file_it_reads(dlib_file, tmp_path):
    """Weights altered (scaled planes, a different bias, filters reordered) give dlib's results for the
    altered detector, which differ from the original's: the port uses every part of the file."""
    model = read_detector_file(dlib_file)
    rng = np.random.default_rng(5)
    filters = model.filters[[3, 0, 4, 1, 2]] * rng.uniform(0.8, 1.25, (5, 31, 1, 1))
    thresholds = model.thresholds[[3, 0, 4, 1, 2]] - 1.0
    altered = _rewrite(dlib_file, filters, thresholds, str(tmp_path / "altered.svm"))
    dlib_altered = dlib.fhog_object_detector(altered)
    ours = FrontalFaceDetector(path=altered)
    photos = original_photos()
    changed = 0
    for photo in photos:
        theirs = dlib_run(dlib_altered, photo.image, 0, 0.0)
        found = ours.detect([photo.image])[0]
        assert difference(found, theirs, 0.0) is None, f"{photo.name}: {difference(found, theirs, 0.0)}"
        changed += theirs != dlib_run(dlib.get_frontal_face_detector(), photo.image, 0, 0.0)
    assert changed >= 1


@pytest.mark.parametrize("cut", [0, 1, 5, 20, 100, 1000, 100_000, -1])
def test_truncated_file_names_file_and_offset(dlib_file, tmp_path, cut):
    with open(dlib_file, "rb") as f:
        data = f.read()
    path = str(tmp_path / "truncated.svm")
    with open(path, "wb") as f:
        f.write(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(DetectorFileError) as err:
        read_detector_file(path)
    message = str(err.value)
    assert path in message and "offset" in message
    offset = int(message.split("offset ")[1].split()[0])
    assert 0 <= offset <= len(data[:cut] if cut >= 0 else data[:-1])


@pytest.mark.parametrize("position, byte, what, offset", [
    (1, 0x03, "object_detector version", 0),    # version 2 -> 3
    (3, 0x02, "scan_fhog_pyramid version", 2),  # scanner version 1 -> 2
    (9, 0x04, "cell_size", 8),                  # cell size 8 -> 4
    (13, 0x60, "number of dimensions", 27),     # 96 px wide window: 12x10 cells, the stored size says 10x10
    (27, 0x7F, "control byte", 27),             # not a valid integer encoding
])
def test_altered_file_names_file_and_offset(dlib_file, tmp_path, position, byte, what, offset):
    with open(dlib_file, "rb") as f:
        data = bytearray(f.read())
    data[position] = byte
    path = str(tmp_path / "altered.svm")
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DetectorFileError) as err:
        read_detector_file(path)
    message = str(err.value)
    assert path in message and what in message and f"offset {offset} " in message, message


def test_extra_bytes_after_the_weights_are_refused(dlib_file, tmp_path):
    path = str(tmp_path / "longer.svm")
    with open(dlib_file, "rb") as f, open(path, "wb") as g:
        g.write(f.read() + encode_int(0))
    with pytest.raises(DetectorFileError, match="after the last weight vector"):
        read_detector_file(path)


# -- the stages, each against dlib ---------------------------------------------------------------------------

def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()


def test_pyramid_levels_equal_dlib():
    """Every level of the pyramid (dlib.pyramid_down(6), the detector's resampling) for a few images."""
    down = dlib.pyramid_down(6)
    images = [p.image for p in original_photos()] + [v.image for v in face_variants(6, seed=2, max_side=400)]
    for image in images:
        for _ in range(5):
            h, w = image.shape[:2]
            theirs = down(image)
            ours = resize_rgb(_as_tensor(image), [(h, w)], [pyramid_down_size(h, w)])
            ours = ours[0].permute(1, 2, 0).numpy()[:theirs.shape[0], :theirs.shape[1]]
            assert theirs.shape[:2] == pyramid_down_size(h, w)
            assert np.array_equal(ours, theirs), f"{(h, w)}: {(ours != theirs).sum()} values differ"
            image = np.ascontiguousarray(theirs)


def test_upsampling_equals_dlib():
    """pyramid_up (detector(img, 1)) is resize_image to (2h + 1, 2w + 2), compared with dlib.resize_image."""
    images = [p.image for p in original_photos()] + [v.image for v in face_variants(6, seed=3, max_side=300)]
    for image in images:
        h, w = image.shape[:2]
        size = pyramid_up_size(h, w)
        theirs = dlib.resize_image(image, *size)
        ours = resize_rgb(_as_tensor(image), [(h, w)], [size])[0].permute(1, 2, 0).numpy()[:size[0], :size[1]]
        assert np.array_equal(ours, theirs), f"{(h, w)}: {(ours != theirs).sum()} values differ"


def _row_table_one(n_in: int, n_out: int):
    """dlib's resize_image row tables for one image, row by row as dlib computes them: the reference for the
    batched resize_tables."""
    scale = (n_in - 1) / max(n_out - 1, 1)
    ys, y = [], -scale
    for _ in range(n_out):
        y += scale  # a double accumulator, one step per row
        ys.append(y)
    ys = np.array(ys, np.float64)
    top = np.floor(ys).astype(np.int64)
    return top, np.minimum(top + 1, n_in - 1), ys - top


def _col_table_one(n_in: int, n_out: int):
    """dlib's resize_image column tables for one image as its SSE loop and its scalar tail compute them:
    (left, right, lr32, lr64, first column of the scalar tail)."""
    scale = (n_in - 1) / max(n_out - 1, 1)
    lanes = np.array([-4 * scale + k * scale for k in range(4)], np.float64).astype(np.float32)
    step = np.float32(4 * scale)
    left, right, lr32, lr64 = [], [], [], []
    x = lanes
    while len(left) < n_out:
        x = (x + step).astype(np.float32)  # float32 accumulator, one step per group of four columns
        cols = x.astype(np.int64)
        if cols[3] + 1 >= n_in:
            break
        for k in range(4):
            left.append(int(cols[k]))
            right.append(int(cols[k]) + 1)
            lr32.append(np.float32(x[k] - np.float32(cols[k])))
            lr64.append(0.0)
    left, right, lr32, lr64 = left[:n_out], right[:n_out], lr32[:n_out], lr64[:n_out]
    tail = len(left)
    xd = -scale + tail * scale
    while len(left) < n_out:
        xd += scale  # the scalar loop's double accumulator
        left.append(int(np.floor(xd)))
        right.append(min(left[-1] + 1, n_in - 1))
        lr32.append(np.float32(0))
        lr64.append(xd - left[-1])
    return (np.array(left, np.int64), np.array(right, np.int64), np.array(lr32, np.float32), np.array(lr64), tail)


def test_batched_resize_tables_are_dlibs_per_image():
    """resize_tables, all images of a batch at once, gives each image the tables dlib's loops compute for it
    alone, bit for bit, for pyramid levels down and up and arbitrary sizes from 1 to 2000 pixels."""
    rng = np.random.default_rng(5)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        ins = [(int(rng.integers(1, 2000)), int(rng.integers(1, 2000))) for _ in range(n)]
        kind = trial % 3
        outs = [pyramid_down_size(h, w) if kind == 0 else pyramid_up_size(h, w) if kind == 1 else
                (int(rng.integers(1, 2000)), int(rng.integers(1, 2000))) for h, w in ins]
        keep = [k for k, (h, w) in enumerate(outs) if h > 0 and w > 0]
        ins, outs = [ins[k] for k in keep], [outs[k] for k in keep]
        if not ins:
            continue
        out_h, out_w = max(h for h, _ in outs), max(w for _, w in outs) + 8
        r = resize_tables(ins, outs, out_h, out_w)
        for b, ((h, w), (oh, ow)) in enumerate(zip(ins, outs)):
            top, bottom, frac = _row_table_one(h, oh)
            for ours, theirs in ((r.top, top), (r.bottom, bottom), (r.tb64, frac),
                                 (r.tb32, frac.astype(np.float32)), (r.inv_tb32, (1 - frac).astype(np.float32))):
                assert np.array_equal(ours[b, :oh], theirs), (h, w, oh, ow)
            left, right, lr32, lr64, tail = _col_table_one(w, ow)
            assert int(r.tail[b]) == tail, (h, w, oh, ow)
            for ours, theirs in ((r.left, left), (r.right, right), (r.lr32, lr32), (r.lr64, lr64),
                                 (r.inv_lr32, (np.float32(1) - lr32).astype(np.float32))):
                assert np.array_equal(ours[b, :ow], theirs), (h, w, oh, ow)
            assert r.top[b].min() >= 0 and r.bottom[b].max() < h and r.left[b].min() >= 0 and r.right[b].max() < w
            # What the Triton resize kernel assumes instead of reading the right neighbours.
            assert np.array_equal(r.right[b, :ow], np.minimum(r.left[b, :ow] + 1, w - 1)), (h, w, oh, ow)


def test_a_batch_of_sizes_resizes_as_dlib_does_each():
    """resize_rgb on one padded batch of images of different sizes: each image's pyramid level and upsampling
    are dlib's (pyramid_down(6), resize_image) of that image alone."""
    images = [v.image for v in face_variants(5, seed=4, max_side=300)]
    sizes = [im.shape[:2] for im in images]
    h_max, w_max = max(h for h, _ in sizes), max(w for _, w in sizes)
    batch = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.uint8)
    for k, im in enumerate(images):
        batch[k, :, :im.shape[0], :im.shape[1]] = _as_tensor(im)[0]
    down = dlib.pyramid_down(6)
    for out_sizes, theirs in (([pyramid_down_size(h, w) for h, w in sizes], [down(im) for im in images]),
                              ([pyramid_up_size(h, w) for h, w in sizes],
                               [dlib.resize_image(im, *pyramid_up_size(*im.shape[:2])) for im in images])):
        ours = resize_rgb(batch, sizes, out_sizes)
        for k, (oh, ow) in enumerate(out_sizes):
            assert np.array_equal(ours[k, :, :oh, :ow].permute(1, 2, 0).numpy(), theirs[k]), sizes[k]


def test_runs_on_pyramid_levels_are_dlibs_runs_on_those_levels(detector, dlib_detector):
    """detect_levels (the torch backend's coarse start and finer runs): several runs per photo in one call, photos
    of several sizes. Run j is dlib's run on the photo's level j (dlib.pyramid_down(6) j times), and bit for bit
    the port's own detect() of that level; the kept levels are dlib's pyramid levels; bad arguments are named."""
    down = dlib.pyramid_down(6)
    images = [p.image for p in original_photos()][:3] + [v.image for v in face_variants(4, seed=7, max_side=500)]
    runs = [[0, 2], [3], [1, 4], [2], [0], [1, 3], [5]]
    got, levels = detector.detect_levels([torch.from_numpy(np.array(im)) for im in images], runs, keep_levels=True)
    compared = 0
    for image, wanted, ours, kept in zip(images, runs, got, levels):
        pyramid = [image]
        while len(pyramid) < len(kept):
            pyramid.append(np.ascontiguousarray(down(pyramid[-1])))
        assert len(kept) > max(wanted)
        for k, (a, b) in enumerate(zip(kept, pyramid)):
            assert np.array_equal(a.numpy(), b), (image.shape, k)
        assert len(ours) == len(wanted)
        for j, run in zip(wanted, ours):
            assert run == detector.detect([pyramid[j]])[0], (image.shape, j)
            diff = difference(run, dlib_run(dlib_detector, pyramid[j], 0, 0.0), 0.0)
            assert diff is None or diff[1], diff
            compared += len(run)
    assert compared >= 5  # the runs found faces to compare
    assert detector.detect_levels(images[:1], [[1]])[1] is None
    with pytest.raises(ValueError, match="keep_levels"):
        detector.detect_levels(images[:1], [[0]], upsample=1, keep_levels=True)
    with pytest.raises(ValueError, match="runs"):
        detector.detect_levels(images[:2], [[0], []])


def test_the_float32_threshold_passes_the_windows_dlibs_double_test_passes():
    """float32_at_least(t) (the detector's threshold on the device): a float32 saliency s passes it exactly when
    dlib's test, s promoted to double >= t, passes; for thresholds that are float32 values, between two of them,
    and the detector file's own, with s on and around each threshold."""
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.normal(0, 1, 500), rng.normal(0, 1, 500).astype(np.float32).astype(np.float64),
                        (read_detector_file(BUNDLED_DETECTOR_FILE).thresholds[None, :]
                         + np.array([0.0, -0.5, 1e-9])[:, None]).ravel()])
    c = float32_at_least(t)
    assert c.dtype == np.float32
    for step in (-2, -1, 0, 1, 2):
        s = c.copy()
        for _ in range(abs(step)):
            s = np.nextafter(s, np.float32(np.inf if step > 0 else -np.inf))
        assert np.array_equal(s >= c, s.astype(np.float64) >= t), step
    assert (c.astype(np.float64) >= t).all() and (np.nextafter(c, np.float32(-np.inf)).astype(np.float64) < t).all()


def test_fhog_planes_equal_dlib_bit_for_bit(dlib_file, tmp_path):
    """Each fHOG plane read back from dlib: a detector whose only weight is 1.0 on that plane at one cell
    scores every window with exactly that feature value (one rank-1 term with unit taps), and with
    overlap thresholds of 1 nothing is suppressed. Every window at every pyramid level must score the
    same, bit for bit, in dlib and in the port."""
    model = read_detector_file(dlib_file)
    # C-contiguous: dlib reads a strided numpy view wrongly at its smaller pyramid levels.
    image = np.ascontiguousarray(original_photos()[0].image[100:400, 60:360])
    compared = 0
    for plane in range(31):
        filters = np.zeros((1, *model.filters.shape[1:]))
        filters[0, plane, 4, 4] = 1.0
        path = _rewrite(dlib_file, filters, np.zeros(1), str(tmp_path / f"plane{plane}.svm"), overlap=(1.0, 1.0))
        theirs = sorted((box, score) for box, score, _ in dlib_run(dlib.fhog_object_detector(path), image, 0,
                                                                 -100.0))
        ours = sorted((box, score) for box, score, _ in FrontalFaceDetector(path=path).detect([image], 0, -100.0)[0])
        assert len(ours) == len(theirs) > 1000
        differing = [(a, b) for a, b in zip(ours, theirs) if a != b]
        assert not differing, f"plane {plane}: {len(differing)} windows differ, e.g. {differing[:3]}"
        compared += len(ours)
    assert compared > 31 * 1000


def test_equal_scores_come_out_in_dlibs_order(detector, dlib_detector):
    """Copies of one face on a flat canvas, 128 px apart (a multiple of the 8 px cell): their windows score
    exactly the same. dlib orders candidates with libstdc++'s unstable std::sort, which the port follows;
    the lists must be identical, order included (a stable sort gets this wrong)."""
    face = np.asarray(Image.fromarray(original_photos()[1].image[120:380, 140:400]).resize((96, 96)))
    tied_images = 0
    for copies in (2, 3):
        canvas = np.full((136, 40 + 128 * copies, 3), 128, np.uint8)
        for k in range(copies):
            canvas[16:112, 24 + 128 * k:120 + 128 * k] = face
        for adjust in (0.0, -2.5):
            theirs = dlib_run(dlib_detector, canvas, 0, adjust)
            ours = detector.detect([canvas], 0, adjust)[0]
            assert ours == theirs, f"{copies} copies, adjust {adjust}:\n  dlib {theirs}\n  port {ours}"
            scores = [d[1] for d in theirs]
            tied_images += len(set(scores)) < len(scores)
    assert tied_images == 4  # every case really had equal scores


# -- bad input ---------------------------------------------------------------------------------------------

def test_bad_images_are_named(detector):
    good = original_photos()[0].image
    with pytest.raises(ValueError, match=r"images\[1\].*HxWx3 uint8"):
        detector.detect([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\].*HxWx3 uint8"):
        detector.detect([good[:, :, 0]])
    with pytest.raises(TypeError, match=r"images\[0\] must be a numpy array or a torch tensor"):
        detector.detect([good.tolist()])
    with pytest.raises(ValueError, match=r"images\[0\].*HxWx3 uint8"):
        detector.detect([torch.zeros(10, 10, 3, dtype=torch.float32)])
    with pytest.raises(TypeError, match="list"):
        detector.detect(good)
    with pytest.raises(ValueError, match="upsample"):
        detector.detect([good], upsample=-1)


def test_tensor_photos_give_the_arrays_results(detector):
    """Photos already in torch (the device aligner's) are read like the arrays they hold, in mixed lists too."""
    photos = [p.image for p in original_photos()]
    want = detector.detect(photos, adjust_threshold=-0.5)
    assert any(want)
    assert detector.detect([torch.from_numpy(p) for p in photos], adjust_threshold=-0.5) == want
    assert detector.detect([photos[0], torch.from_numpy(photos[1])], adjust_threshold=-0.5) == want[:2]


def test_tiny_and_empty_images_like_dlib(detector, dlib_detector):
    images = [np.zeros((0, 5, 3), np.uint8), np.full((1, 1, 3), 200, np.uint8),
              np.random.default_rng(1).integers(0, 256, (7, 30, 3), dtype=np.uint8),
              np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)]
    for upsample in (0, 1):
        found = detector.detect(images, upsample=upsample, adjust_threshold=-2.0)
        for image, ours in zip(images, found):
            theirs = dlib_run(dlib_detector, image, upsample, -2.0) if image.size else []
            assert difference(ours, theirs, -2.0) is None, difference(ours, theirs, -2.0)


# -- equality with dlib ------------------------------------------------------------------------------------

@pytest.mark.parametrize("upsample", [0, 1])
@pytest.mark.parametrize("adjust", [0.0, -0.5])
def test_photographs_equal_dlib(detector, dlib_detector, upsample, adjust):
    photos = original_photos()
    worst = assert_equal_to_dlib(detector, dlib_detector, photos, upsample, adjust, min_detections=2)
    assert worst == 0.0, "scores are expected bit for bit (dlib-bin's x86-64 AVX build)"
    # Each photograph alone (batch of one) gives the same as in the batch.
    batched = detector.detect([p.image for p in photos], upsample, adjust)
    alone = [detector.detect([p.image], upsample, adjust)[0] for p in photos]
    assert batched == alone


@pytest.mark.slow
@pytest.mark.parametrize("adjust", [0.0, -0.5])
def test_variants_equal_dlib_upsample_0(detector, dlib_detector, adjust):
    variants = face_variants(200, seed=0, max_side=640) + faceless_variants(20, seed=0, max_side=640)
    assert_equal_to_dlib(detector, dlib_detector, variants, 0, adjust, min_detections=60)


@pytest.mark.slow
@pytest.mark.parametrize("adjust", [0.0, -0.5])
def test_variants_equal_dlib_upsample_1(detector, dlib_detector, adjust):
    variants = face_variants(60, seed=1, max_side=400) + faceless_variants(6, seed=1, max_side=400)
    assert_equal_to_dlib(detector, dlib_detector, variants, 1, adjust, min_detections=10)


def test_upload_many_gives_back_every_array_as_it_was():
    """The kernels' tables travel packed in one buffer: each comes back with its values, dtype and shape,
    whatever the alignment of the one before it."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-9, 9, 5).astype(np.int64), rng.random((1, 3)).astype(np.float32),
              rng.random(3) > 0.5, rng.random((2, 3))[:, ::2], np.zeros((0,), np.int64),
              rng.integers(0, 255, (3, 7)).astype(np.uint8), rng.random((4, 2))]
    got = upload_many(arrays, "cpu")
    assert len(got) == len(arrays)
    for g, a in zip(got, arrays):
        assert g.numpy().dtype == a.dtype and tuple(g.shape) == a.shape
        assert np.array_equal(g.numpy(), a)


def test_a_kernel_group_that_disagrees_warns_once_and_falls_back_to_torch():
    """kernel_check.use_kernels, the one way every port trusts its kernels: a group is checked once per device
    and process; a check that finds a difference, or fails, warns naming the group and the device and the
    torch path serves; True forces the kernels (refused where they cannot run), False never runs a check."""
    runs = []

    def disagrees(device):
        runs.append(device)
        return "3 values differ"

    def fails(device):
        raise RuntimeError("no compiler")

    device = torch.device("cuda", 7)  # auto mode checks on CUDA only; the probes here touch no device
    with pytest.warns(RuntimeWarning, match=r"Triton probe-a kernels .* on cuda:7 \(3 values differ\)"):
        assert use_kernels("probe-a", device, None, disagrees) is False
    assert use_kernels("probe-a", device, None, disagrees) is False
    assert runs == [device]  # once per device and process
    with pytest.warns(RuntimeWarning, match=r"Triton probe-b kernels .* \(RuntimeError: no compiler\)"):
        assert use_kernels("probe-b", device, None, fails) is False
    assert use_kernels("probe-a", device, False, disagrees) is False
    assert use_kernels("probe-c", "cpu", None, disagrees) is False  # the torch path on CPU, unchecked
    assert runs == [device]
    with pytest.raises(ValueError, match="use_triton needs a CUDA device"):
        use_kernels("probe-d", "cpu", True, disagrees)
    with pytest.raises(ValueError, match="use_triton needs a CUDA device"):
        FrontalFaceDetector("cpu", use_triton=True)
