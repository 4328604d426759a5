"""align.backend: dlib (CPU tasks) and torch (on the inversion actor's device) give the same rows.

dlib's backend is the reference. The torch backend runs here on CPU (the same code as on a GPU), where its
detector is slow, so the photos are small (at most 320 px): the test photographs' faces, variants (moved,
scaled, rolled), faceless photos, a photo with two faces and bad inputs.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers.face_variants import face_variants, faceless_variants, load_photo
from helpers.inputs import pipeline_config, tiny_image_bytes
from models.alignment.ffhq_crop import upright_landmarks
from models.alignment.ffhq_geometry import UPRIGHT_ABOVE
from pipeline.align import FaceAligner, get_aligner
from pipeline.config import AlignConfig, ConfigError, InputConfig, PrepareConfig, fingerprint, resolve
from pipeline.device_align import ALIGN_PARTS, DeviceAligner, align_photos, resolve_align_backend
from pipeline.face_search import HOG_MIN_FACE, faces_that_count, pick_largest, upsample_runs
from pipeline import inverter
from pipeline.inversion import ALIGN_PARTS_LINE
from pipeline.inverter import Inverter, aligning_actor_calls, aligning_lanes
from pipeline.model_files import find_landmark_model
from pipeline.prepare import prepare_item
from pipeline.read import InputItem
from pipeline.records import ALIGN_PENDING, PreparedChunk
from pipeline.runner import run


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photos() -> dict[str, bytes]:
    """name -> encoded input: faces, rolled faces, variants, faceless photos, two faces, bad inputs."""
    astro = load_photo("astronaut.jpg").crop((110, 20, 330, 240))          # head and shoulders, face ~90 px
    hopper = load_photo("grace_hopper.jpg")
    hopper_small = hopper.resize((256, 300), Image.Resampling.LANCZOS)     # face ~105 px
    rolled = hopper.crop((130, 100, 410, 400)).rotate(30, resample=Image.Resampling.BILINEAR, fillcolor=(90, 90, 90))
    rolled = rolled.resize((224, 240), Image.Resampling.LANCZOS)
    two = Image.new("RGB", (460, 220), (90, 90, 90))
    two.paste(astro, (0, 0))
    two.paste(hopper.crop((140, 110, 400, 390)).resize((220, 220), Image.Resampling.LANCZOS), (240, 0))
    out = {"astro": _jpeg(astro), "hopper": _jpeg(hopper_small), "rolled": _jpeg(rolled), "pair": _jpeg(two)}
    for v in face_variants(4, seed=3, max_side=320, min_side=160):
        out[f"variant{len(out)}"] = _jpeg(Image.fromarray(v.image))
    out["china"] = _jpeg(load_photo("china.jpg").resize((180, 120), Image.Resampling.LANCZOS))
    for v in faceless_variants(2, seed=3, max_side=200, min_side=96):
        out[f"faceless{len(out)}"] = _png(Image.fromarray(v.image))
    good = _jpeg(hopper_small)
    out.update({"zero_bytes": b"", "truncated": good[: len(good) // 2], "not_an_image": b"plain text\n" * 20,
                "tiny_noise": tiny_image_bytes(5)})
    bomb = io.BytesIO()
    Image.new("1", (400, 400)).save(bomb, format="PNG")
    out["bomb"] = bomb.getvalue()
    return out


PNG_SIGNATURE = b"\x89PNG"
MAX_PIXELS = 150_000  # input.max_pixels: the bomb (160k pixels) is refused, the photos are not


def _prepare_cfg(backend: str, policy: str = "largest") -> PrepareConfig:
    return PrepareConfig(InputConfig(url="/unused", max_pixels=MAX_PIXELS), AlignConfig(policy=policy, backend=backend),
                         None, 64, "invert", False)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return _photos()


@pytest.fixture(scope="module")
def torch_aligners():
    """One DeviceAligner per policy on CPU, sharing the models (the predictor takes a few seconds to load)."""
    largest = DeviceAligner.build(AlignConfig(policy="largest", backend="torch"), "cpu")
    return {"largest": largest,
            "all": DeviceAligner(AlignConfig(policy="all", backend="torch"), largest.detector, largest.predictor,
                                 largest.max_group_pixels)}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _compare(dlib_rows, dlib_faces, torch_rows, torch_faces):
    """Same keys, statuses, errors, face indices, boxes' scores; landmarks identical on >= 99% of faces;
    quads within a pixel where landmarks differ; crops >= 50 dB."""
    assert [(r.key, r.status, r.error, r.face_index) for r in torch_rows] == \
        [(r.key, r.status, r.error, r.face_index) for r in dlib_rows]
    ok = [(a, b) for a, b in zip(dlib_rows, torch_rows) if a.status == "ok"]
    same = sum(a.landmarks == b.landmarks for a, b in ok)
    assert same >= 0.99 * len(ok), f"landmarks identical on {same}/{len(ok)} faces"
    for a, b in ok:
        assert b.score == pytest.approx(a.score, abs=1e-6), a.key
        np.testing.assert_allclose(b.quad, a.quad, atol=1.0, err_msg=a.key)
    assert len(torch_faces) == len(dlib_faces) == len(ok)
    worst = min((_psnr(x, y) for x, y in zip(dlib_faces, torch_faces)), default=float("inf"))
    assert worst >= 50.0, f"worst crop {worst:.1f} dB"


@pytest.mark.parametrize("policy", ["largest", "all"])
def test_torch_alignment_equals_dlib_without_ray(photos, torch_aligners, policy):
    """The actor's plain function (decoded photos -> rows and faces) against the dlib backend's prepare."""
    dlib_rows, dlib_faces, pending, pending_photos = [], [], [], []
    for name, data in photos.items():
        for row, face in prepare_item(InputItem(name, f"/in/{name}", data), _prepare_cfg("dlib", policy), {}):
            dlib_rows.append(row)
            if face is not None:
                dlib_faces.append(face)
        # The torch backend's CPU side only decodes: one pending row with the decoded photo, or the error row.
        for row, photo in prepare_item(InputItem(name, f"/in/{name}", data), _prepare_cfg("torch", policy), {}):
            pending.append(row)
            if photo is not None:
                assert row.status == ALIGN_PENDING and photo.dtype == np.uint8 and photo.ndim == 3
                pending_photos.append(photo)
    rows, faces, face_photo, seconds = align_photos(torch_aligners[policy], pending_photos, pending)
    _compare(dlib_rows, dlib_faces, rows, faces)
    statuses = {r.key: r.status for r in rows}
    assert statuses["zero_bytes"] == "empty_file" and statuses["bomb"] == "decompression_bomb"
    assert statuses["truncated"] == statuses["not_an_image"] == "decode_error"
    assert statuses["china"] == "no_face" and statuses["astro"] == statuses["rolled"] == "ok"
    two = [r for r in rows if r.key.startswith("pair")]
    assert len(two) == (2 if policy == "all" else 1)
    # Each face's photo index points at the photo its row came from.
    photo_keys = [r.key for r in pending if r.status == ALIGN_PENDING]
    ok_rows = [r for r in rows if r.status == "ok"]
    assert [r.key.split("_face")[0] for r in ok_rows] == [photo_keys[p] for p in face_photo]
    assert seconds > 0


def _larger_photos() -> list[np.ndarray]:
    """Photos larger than the others here: a face scaled up, a small face in a large frame (under the
    largest policy's rule at min_face_size 70), two faces, and a faceless photo."""
    astro = load_photo("astronaut.jpg").crop((110, 20, 330, 240))
    hopper = load_photo("grace_hopper.jpg").resize((150, 176), Image.Resampling.LANCZOS)   # face ~60 px
    rng = np.random.default_rng(2)
    frame = Image.fromarray(rng.integers(60, 120, (420, 560, 3), dtype=np.uint8))
    frame.paste(hopper, (330, 170))
    two = Image.new("RGB", (520, 300), (90, 90, 90))
    two.paste(astro.resize((250, 250), Image.Resampling.LANCZOS), (0, 20))
    two.paste(load_photo("grace_hopper.jpg").resize((230, 270), Image.Resampling.LANCZOS), (280, 10))
    china = load_photo("china.jpg").resize((480, 320), Image.Resampling.LANCZOS)
    return [np.asarray(astro.resize((500, 500), Image.Resampling.LANCZOS)), np.asarray(frame), np.asarray(two),
            np.asarray(china)]


@pytest.mark.parametrize("policy,min_face_size,max_upsample,detect_max_side",
                         [("largest", 0, 0, None), ("all", 0, 0, None), ("largest", 70, 0, None), ("largest", 0, 1, None),
                          ("largest", 0, 0, 384), ("all", 0, 0, 384), ("largest", 70, 0, 200), ("largest", 0, 1, 384)])
def test_device_detection_makes_the_dlib_backends_runs(torch_aligners, policy, min_face_size, max_upsample,
                                                       detect_max_side):
    """The torch backend's detections are the dlib backend's, photo by photo (boxes, scores), from the
    full-resolution photo (device_detect_max_side null, the default: one detector call for all photos, then
    the upsampled run only on photos where nothing counted) and from a coarse pyramid level (its finer search
    and finer runs included: more calls, the first one for all photos)."""
    photos = _larger_photos()
    cfg = AlignConfig(policy=policy, backend="torch", max_upsample=max_upsample, min_face_size=min_face_size,
                      device_detect_max_side=detect_max_side)
    base = torch_aligners["largest"]
    aligner = DeviceAligner(cfg, base.detector, base.predictor, base.max_group_pixels)
    reference = FaceAligner(predictor_path=find_landmark_model(None), detect_max_side=detect_max_side,
                            max_upsample=max_upsample)
    calls = []  # (images, upsample) of each detector call (detect() makes its one call of detect_levels)
    detect_levels = base.detector.detect_levels
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base.detector, "detect_levels", lambda images, runs, upsample=0, *a, **k:
                   calls.append((len(images), upsample)) or detect_levels(images, runs, upsample, *a, **k))
        got = aligner.detect([torch.from_numpy(p.copy()) for p in photos])
    want = [reference.detect(p, min_face_size=min_face_size, exhaustive=policy == "all") for p in photos]
    assert [[b for b, _ in d] for d in got] == [[b for b, _ in d] for d in want]
    assert all(abs(a - b) < 1e-9 for g, w in zip(got, want) for (_, a), (_, b) in zip(g, w))
    assert got[0] and got[2] and not got[3]
    upsampled = [i for i, p in enumerate(photos) if not got[i] and max(p.shape) <= cfg.upsample_max_side]
    last = [(len(upsampled), 1)] if max_upsample and upsampled else []
    if detect_max_side is None:
        assert calls == [(len(photos), 0)] + last
    else:
        assert calls[0] == (len(photos), 0) and len(calls) > 1 + len(last)
        assert calls[len(calls) - len(last):] == last and all(up == 0 for _, up in calls[:len(calls) - len(last)])


def _rolled_group() -> list[np.ndarray]:
    """Small photos of the two heads turned by 16-40 degrees (the ones past 35 are misjudged at first and take
    the second upright round) and one upright face."""
    hopper = load_photo("grace_hopper.jpg").crop((130, 100, 410, 400)).resize((200, 214), Image.Resampling.LANCZOS)
    astro = load_photo("astronaut.jpg").crop((110, 20, 330, 240))
    turns = [(hopper, -36), (hopper, -16), (hopper, 24), (hopper, 40), (astro, -40), (astro, 20), (astro, 0)]
    return [np.asarray(head.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(90, 90, 90)))
            for head, angle in turns]


def test_rolled_faces_are_predicted_upright_together(torch_aligners, monkeypatch):
    """DeviceAligner.align predicts a group's rolled faces again in one predictor call per round (the first
    prediction, all faces rolled past 10 degrees, those whose roll moved by over 5): each face's landmarks
    equal its own upright_landmarks, face by face, which makes one call per face and round."""
    aligner = torch_aligners["largest"]
    photos = _rolled_group()
    calls: list[int] = []
    real_predict = aligner.predictor.predict
    monkeypatch.setattr(aligner.predictor, "predict",
                        lambda images, boxes: calls.append(len(images)) or real_predict(images, boxes))
    aligned = aligner.align(photos)
    monkeypatch.undo()
    assert all(len(faces) == 1 for faces in aligned)
    rounds = []
    for photo, (face,) in zip(photos, aligned):
        predictions = []

        def predict_one(image, box):
            predictions.append(box)
            return aligner.predict_boxes([image], [box])[0]

        alone = upright_landmarks(torch.from_numpy(photo.copy()), face.box, predict_one, UPRIGHT_ABOVE)
        np.testing.assert_array_equal(face.landmarks, alone)
        rounds.append(len(predictions))
    # The per-face path's rounds, counted per round, are the batched path's call sizes.
    assert calls == [len(photos)] + [sum(r > k for r in rounds) for k in (1, 2) if any(r > k for r in rounds)]
    assert rounds.count(1) == 1 and rounds.count(3) >= 2, rounds


def test_photo_groups_bound_memory_and_keep_order(photos, torch_aligners):
    """Groups of at most max_group_pixels (a larger photo alone) give the rows of one group."""
    cfg = _prepare_cfg("torch")
    pending, images = [], []
    for name in ("astro", "china", "pair", "hopper"):
        for row, photo in prepare_item(InputItem(name, name, photos[name]), cfg, {}):
            pending.append(row)
            images.append(photo)
    one = torch_aligners["largest"]
    small = DeviceAligner(one.cfg, one.detector, one.predictor, max_group_pixels=60_000)  # every photo alone
    whole = align_photos(one, images, pending)
    alone = align_photos(small, images, pending)
    assert [vars(r) for r in alone[0]] == [vars(r) for r in whole[0]]
    np.testing.assert_array_equal(alone[1], whole[1])
    assert alone[2] == whole[2]
    with pytest.raises(ValueError, match="photos for"):
        align_photos(one, images[:2], pending)


def test_face_rule_drops_weak_detections_in_both_policies():
    """The astronaut's mission patch is a weak detector hit (score under half the face's): no policy keeps it."""
    astro = np.asarray(load_photo("astronaut.jpg"))
    aligner = get_aligner()
    dets = aligner.detect(astro, exhaustive=True)
    best = max(s for _, s in dets)
    weak = [d for d in dets if d[1] < 0.5 * best]
    assert weak, "the mission patch is expected among the raw detections"
    assert faces_that_count(dets) == [d for d in dets if d[1] >= 0.5 * best]
    faces = aligner.align(astro, 64, 128, policy="all")
    assert [f.score for f in faces] == [s for _, s in faces_that_count(dets)]
    assert pick_largest(dets) in faces_that_count(dets)
    # Two real faces of one photo score alike: both count.
    assert len(faces_that_count([((0, 0, 80, 80), 1.2), ((100, 0, 170, 70), 0.9), ((0, 100, 90, 190), 0.3)])) == 2
    assert faces_that_count([]) == []


def test_upsampling_is_bounded_by_photo_size(monkeypatch):
    """A faceless photo over align.upsample_max_side costs no upsampled run (the 400 ms part); a small one
    still gets it, and a small face in a small photo is still found."""
    assert upsample_runs(600, 700, 1, 0, 800) == [1]
    assert upsample_runs(600, 801, 1, 0, 800) == []
    assert upsample_runs(600, 2000, 2, 0, None) == [1, 2]
    assert upsample_runs(300, 300, 2, HOG_MIN_FACE / 2, None) == [1]   # run 2 finds only faces under min size
    aligner = FaceAligner(upsample_max_side=800)
    calls = []
    real_run = aligner.detector.run
    monkeypatch.setattr(aligner, "detector", type("Counting", (), {
        "run": staticmethod(lambda img, up, adj: calls.append((img.shape, up)) or real_run(img, up, adj))})())
    china = np.asarray(load_photo("china.jpg").resize((1000, 667), Image.Resampling.LANCZOS))
    assert aligner.align(china) == []
    assert calls and all(up == 0 for _, up in calls)
    calls.clear()
    assert aligner.align(china[:400, :600].copy()) == []
    assert any(up == 1 for _, up in calls)


def test_config_keys_validated():
    base = {"input": {"url": "/in"}, "output": {"url": "/out"}, "model": {"checkpoint": "x.pt"}}
    assert resolve(base).align.backend == "auto" and resolve(base).align.upsample_max_side == 800
    assert resolve(base, {"align": {"backend": "torch", "upsample_max_side": None}}).align.backend == "torch"
    with pytest.raises(ConfigError, match="align.backend"):
        resolve(base, {"align": {"backend": "cuda"}})
    with pytest.raises(ConfigError, match="align.upsample_max_side"):
        resolve(base, {"align": {"upsample_max_side": 0}})
    for lanes in (0, 17, 1.5):
        with pytest.raises(ConfigError, match="align.device_lanes"):
            resolve(base, {"align": {"device_lanes": lanes}})
    cfg = resolve(base, {"align": {"device_lanes": 3}})
    assert aligning_lanes(cfg.align, "cuda:0") == 3 and aligning_actor_calls(cfg.align) == 5
    default = resolve(base).align
    assert aligning_lanes(default, "cpu") == 1 and aligning_actor_calls(default) == 6
    assert aligning_lanes(default, "cuda:0", total_memory=141 * 2 ** 30) == 4     # an H200
    assert aligning_lanes(default, "cuda:0", total_memory=24 * 2 ** 30) == 2      # a 24 GB GPU
    assert aligning_lanes(cfg.align, "cuda:0", total_memory=24 * 2 ** 30) == 3
    # lanes change only the speed: runs with other lanes resume each other's outputs
    assert fingerprint(cfg, "0" * 64)[0] == fingerprint(resolve(base), "0" * 64)[0]
    assert resolve_align_backend("auto", "cuda:0") == "torch"
    assert resolve_align_backend("auto", "cpu") == "dlib"       # the CPU default stays today's dlib path
    assert resolve_align_backend("torch", "cpu") == "torch" and resolve_align_backend("dlib", "cuda") == "dlib"


def test_invert_worker_aligns_photo_chunks_without_ray(photos, tiny_checkpoint):
    """The actor class called directly: a chunk of photos comes back aligned and inverted, a chunk of faces
    as before, a chunk without any face with its no_face rows."""
    worker = Inverter(tiny_checkpoint, device="cpu", batch_size=4, compile=False,
                      align=AlignConfig(backend="torch"))
    assert worker.info()["align_backend"] == "torch"
    assert list(worker.info()["init_seconds"]) == ["load", "aligner"]  # the start's steps, for the run's log
    cfg_t, cfg_d = _prepare_cfg("torch"), _prepare_cfg("dlib")

    def chunk(names, cfg, index):
        rows, images = [], []
        for name in names:
            for row, image in prepare_item(InputItem(name, name, photos[name]), cfg, {}):
                rows.append(row)
                if image is not None:
                    images.append(image)
        if cfg.align.backend == "torch":
            return PreparedChunk("s", index, rows, np.zeros((0, 256, 256, 3), np.uint8), {}, len(names), None, images)
        faces = np.stack(images) if images else np.zeros((0, 256, 256, 3), np.uint8)
        return PreparedChunk("s", index, rows, faces, {}, len(names))

    names = ["astro", "zero_bytes", "pair", "china"]
    photo_chunk, face_chunk, faceless = chunk(names, cfg_t, 0), chunk(names, cfg_d, 1), chunk(["china"], cfg_t, 2)
    res_photo, res_face, res_none = worker.invert_chunks(photo_chunk, face_chunk, faceless)
    assert [(r.key, r.status) for r in res_photo.rows] == [(r.key, r.status) for r in face_chunk.rows]
    assert len(res_photo.codes) == len(res_face.codes) == face_chunk.n_faces == 2
    assert res_face.rows is None and res_photo.face_photo == [0, 1]
    assert res_photo.codes.shape[1:] == (worker.model.n_latent, worker.model.decoder.style_dim)
    assert [r.status for r in res_none.rows] == ["no_face"] and len(res_none.codes) == 0
    # Where alignment's time went: every part ran (the photo chunk has faces to predict and crop).
    parts = worker.align_part_seconds()
    assert list(parts) == list(ALIGN_PARTS) and all(v > 0 for v in parts.values()), parts
    dlib_only = Inverter(tiny_checkpoint, device="cpu", batch_size=4, compile=False, align=AlignConfig())
    assert dlib_only.info()["align_backend"] == "dlib" and dlib_only.aligner is None
    assert dlib_only.align_part_seconds() == {}
    with pytest.raises(ValueError, match="does not align"):
        dlib_only.invert_chunks(photo_chunk)


class _AtOnce:
    """Wraps a function: counts how many of its calls run at once (the most in ``most``), records the length of
    each call's last positional argument (faces), and holds each call long enough for other threads to reach
    it meanwhile."""

    def __init__(self, fn):
        self.fn, self.lock = fn, threading.Lock()
        self.running = self.most = 0
        self.sizes: list[int] = []

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(args[-1]) if hasattr(args[-1], "__len__") else None)
        time.sleep(0.3)
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def _photo_chunks(photos, names) -> list[PreparedChunk]:
    """One chunk of one decoded photo per name, as the CPU tasks hand them to an aligning actor."""
    cfg = _prepare_cfg("torch")
    chunks = []
    for k, name in enumerate(names):
        rows, images = zip(*prepare_item(InputItem(name, name, photos[name]), cfg, {}))
        chunks.append(PreparedChunk("s", k, list(rows), np.zeros((0, 256, 256, 3), np.uint8), {}, 1, None,
                                    list(images)))
    return chunks


def _invert_at_once(worker, chunks) -> list:
    """Each chunk's result, every chunk in a call of its own from threads at once (as Ray's max_concurrency)."""
    results = [None] * len(chunks)

    def call(k):
        results[k] = worker.invert_chunks(chunks[k])[0]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_an_aligning_actor_inverts_its_calls_faces_together(photos, tiny_checkpoint, monkeypatch):
    """Calls at once in an actor that aligns (as Ray's max_concurrency runs it) bring their faces to one shared
    batch (pipeline.invert.SharedInversion), one batch at a time without a CUDA graph; each call still gets
    the result it gets alone. (Alignment is replayed from a first pass, so that the calls reach their
    inversions together.)"""
    worker = Inverter(tiny_checkpoint, device="cpu", batch_size=4, compile=False,
                      align=AlignConfig(backend="torch"))
    chunks = _photo_chunks(photos, ["astro", "hopper", "pair"])
    want = [worker.invert_chunks(c)[0] for c in chunks]  # one after the other
    # Alignment as already done, each call's ending once all three align (the sharing under test is
    # inversion's): the calls reach inversion together.
    aligned = {id(c.photos): align_photos(worker.aligner, c.photos, c.rows) for c in chunks}
    all_aligning = threading.Barrier(len(chunks))

    def replayed_alignment(aligner, photos, rows, serial):
        all_aligning.wait(10)
        return aligned[id(photos)]

    monkeypatch.setattr(inverter, "align_photos", replayed_alignment)
    inversions = _AtOnce(inverter.invert_faces)
    monkeypatch.setattr(inverter, "invert_faces", inversions)
    results = _invert_at_once(worker, chunks)
    assert inversions.most == 1 and inversions.sizes == [3]  # the three calls' faces in one batch of 4
    for res, expected in zip(results, want):
        assert [(r.key, r.status) for r in res.rows] == [(r.key, r.status) for r in expected.rows]
        np.testing.assert_allclose(res.codes, expected.codes, rtol=0, atol=1e-6)
    assert [len(res.codes) for res in results] == [1, 1, 1]


@pytest.mark.parametrize("lanes", [1, 2])
def test_an_aligning_actor_aligns_as_many_calls_at_once_as_it_has_lanes(photos, tiny_checkpoint, monkeypatch, lanes):
    """Calls at once in an aligning actor align ``align.device_lanes`` at a time (each on a lane of its own),
    never more, and each call's faces and rows are those it gets alone."""
    worker = Inverter(tiny_checkpoint, device="cpu", batch_size=4, compile=False,
                      align=AlignConfig(backend="torch", device_lanes=lanes))
    assert worker.info()["align_lanes"] == lanes
    chunks = _photo_chunks(photos, ["astro", "hopper", "pair"])
    want = [worker.invert_chunks(c)[0] for c in chunks]  # one after the other
    alignments = _AtOnce(worker.aligner.align)
    monkeypatch.setattr(worker.aligner, "align", alignments)
    results = _invert_at_once(worker, chunks)
    assert alignments.most == lanes
    for res, expected in zip(results, want):
        assert [(r.key, r.status) for r in res.rows] == [(r.key, r.status) for r in expected.rows]
        np.testing.assert_array_equal(res.faces, expected.faces)
        np.testing.assert_allclose(res.codes, expected.codes, rtol=0, atol=1e-6)


def _read_output(out: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The latents table (sorted by key) and the image members by name."""
    df = pd.read_parquet(os.path.join(out, "latents")).sort_values("key").reset_index(drop=True)
    images = {}
    for name in sorted(os.listdir(os.path.join(out, "images"))):
        with tarfile.open(os.path.join(out, "images", name)) as tf:
            for m in tf.getmembers():
                images[m.name] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return df, images


@pytest.mark.ray
@pytest.mark.parametrize("policy", ["all"])
def test_pipeline_runs_agree_across_backends(ray_session, tmp_path, photos, tiny_checkpoint, policy):
    """Two real local Ray runs over the same folder, align.backend dlib and torch (the actor on CPU)."""
    src = tmp_path / "in"
    src.mkdir()
    for name, data in photos.items():
        ext = "png" if data.startswith(PNG_SIGNATURE) else "jpg"
        (src / f"{name}.{ext}").write_bytes(data)
    outs = {}
    for backend in ("dlib", "torch"):
        out = str(tmp_path / f"out_{backend}")
        cfg = pipeline_config(str(src), out, tiny_checkpoint, align__enabled=True, align__backend=backend,
                              align__policy=policy, input__max_pixels=MAX_PIXELS, output__save_aligned=True,
                              output__image_format="png", output__paste_back=True, shard_size=9,
                              ray__chunk_size=3)
        lines = []
        res = run(cfg, echo=lines.append)
        assert res.exit_code == 0
        assert any(f"alignment: {backend}" in line for line in lines)
        # The summary says where the actors' alignment spent its time (torch backend only).
        parts = [line for line in lines if line.startswith(ALIGN_PARTS_LINE)]
        assert len(parts) == (backend == "torch"), lines
        if parts:
            assert [p.split()[0] for p in parts[0].split(": ")[1].split(", ")] == list(ALIGN_PARTS)
        # ... and carries them in its dict (the run's _run.json, benchmarks).
        by_part = res.summary.get("align_seconds_by_part")
        assert (by_part is not None) == (backend == "torch")
        if by_part is not None:
            assert list(by_part) == list(ALIGN_PARTS) and all(v > 0 for v in by_part.values()), by_part
        outs[backend] = _read_output(out)
    (d, d_images), (t, t_images) = outs["dlib"], outs["torch"]
    assert list(d.columns) == list(t.columns)
    cols = ["key", "source", "face_index", "status", "error"]
    pd.testing.assert_frame_equal(t[cols], d[cols])
    assert len(d) == len(photos) + 1   # the two-face photo's second face
    ok = d.status == "ok"
    same = sum(np.array_equal(a, b) for a, b in zip(d.landmarks[ok], t.landmarks[ok]))
    assert same >= 0.99 * ok.sum()
    assert t.codes[ok].notna().all() and t.codes[~ok].isna().all()
    # The same members: reconstructions, aligned crops and paste-backs (each face into its own photo).
    assert sorted(t_images) == sorted(d_images)
    aligned = [k for k in d_images if ".aligned." in k]
    assert sorted(k.split(".aligned.")[0] for k in aligned) == sorted(d.key[ok])
    assert min(_psnr(d_images[k], t_images[k]) for k in aligned) >= 50.0
    pastes = [k for k in d_images if k.endswith(".paste.png")]
    assert len(pastes) == ok.sum()
    for k in pastes:
        assert t_images[k].shape == d_images[k].shape
        assert _psnr(d_images[k], t_images[k]) >= 30.0, k


def test_a_photo_that_fails_to_align_costs_its_own_row(photos, torch_aligners, monkeypatch):
    """A failure inside a group's alignment (injected for one photo) makes that photo an align_error row; the
    other photos of the group are aligned one by one and keep their rows."""
    cfg = _prepare_cfg("torch")
    pending, images = [], []
    for name in ("astro", "hopper", "china"):
        for row, photo in prepare_item(InputItem(name, name, photos[name]), cfg, {}):
            pending.append(row)
            images.append(photo)
    aligner = torch_aligners["largest"]
    want = align_photos(aligner, images, pending)
    real_align = DeviceAligner.align
    bad_shape = images[1].shape

    def failing_align(self, group):  # align_photos passes each group's photos staged (StagedPhotos)
        if any(p.shape == bad_shape for p in group.photos):
            raise RuntimeError("injected failure")
        return real_align(self, group)

    monkeypatch.setattr(DeviceAligner, "align", failing_align)
    rows, faces, face_photo, _ = align_photos(aligner, images, pending)
    assert [(r.key, r.status) for r in rows] == [("astro", "ok"), ("hopper", "align_error"), ("china", "no_face")]
    assert rows[1].error == "RuntimeError: injected failure"
    assert vars(rows[0]) == vars(want[0][0]) and face_photo == [0]
    np.testing.assert_array_equal(faces[0], want[1][0])


def test_photos_are_staged_outside_the_serial_context(photos, torch_aligners, monkeypatch):
    """align_photos copies each group's photos on the host (DeviceAligner.stage) before it enters ``serial()``
    (the actor's alignment lock), and aligns them inside it: one chunk is staged while another aligns. The rows
    are those of a plain call."""
    cfg = _prepare_cfg("torch")
    pending, images = [], []
    for name in ("astro", "china"):
        for row, photo in prepare_item(InputItem(name, name, photos[name]), cfg, {}):
            pending.append(row)
            images.append(photo)
    aligner = torch_aligners["largest"]
    want = align_photos(aligner, images, pending)
    inside, seen = [False], []
    real_stage, real_align = DeviceAligner.stage, DeviceAligner.align

    def stage(self, group):
        seen.append(("stage", inside[0]))
        return real_stage(self, group)

    def align(self, staged):
        seen.append(("align", inside[0]))
        return real_align(self, staged)

    @contextlib.contextmanager
    def serial():
        inside[0] = True
        yield
        inside[0] = False

    monkeypatch.setattr(DeviceAligner, "stage", stage)
    monkeypatch.setattr(DeviceAligner, "align", align)
    rows, faces, face_photo, _ = align_photos(aligner, images, pending, serial=serial)
    assert seen == [("stage", False), ("align", True)]
    assert [vars(r) for r in rows] == [vars(r) for r in want[0]] and face_photo == want[2]
    np.testing.assert_array_equal(faces, want[1])
