"""pipeline.invert.SharedInversion: the faces of an aligning actor's calls that run at once, inverted together in
full batches, each call getting back its own faces' results in order (the batch function here is a stand-in
whose outputs are a known function of each face, so that any mix-up between calls or faces shows)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.invert import SharedInversion
from pipeline.records import EditResult, EditVariant, InvertResult


class RecordingInverter:
    """Per face: code = its pixel sum, recon = the face, mse = its first pixel; one edit variant doubling the
    code. Records each batch's size and whether two batches ever ran at once."""

    def __init__(self, fail_on: int | None = None, delay: float = 0.02):
        self.sizes: list[int] = []
        self.running = self.most = 0
        self.lock = threading.Lock()
        self.fail_on, self.delay = fail_on, delay

    def __call__(self, faces: np.ndarray, keys: list):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(faces))
            batch_no = len(self.sizes) - 1
        try:
            time.sleep(self.delay)
            if batch_no == self.fail_on:
                raise RuntimeError("CUDA error: an injected fault")
            codes = faces.reshape(len(faces), -1).sum(1).astype(np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
            res = InvertResult(codes, faces.copy(), faces[:, 0, 0, 0].astype(np.float32), np.zeros(len(faces), np.float32),
                               3, seconds=0.1 * len(faces))
            assert len(keys) == len(faces)
            return res, EditResult([EditVariant("edit_x_2", 2 * codes, faces[:, ::-1].copy())], save_codes=True)
        finally:
            with self.lock:
                self.running -= 1


def _faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def _check(result, faces: np.ndarray) -> None:
    res, edit = result
    want = faces.reshape(len(faces), -1).sum(1).astype(np.float32)
    np.testing.assert_array_equal(res.codes[:, 0, 0], want)
    np.testing.assert_array_equal(res.recon, faces)
    np.testing.assert_array_equal(res.mse, faces[:, 0, 0, 0].astype(np.float32))
    assert res.stages == 3 and res.seconds == pytest.approx(0.1 * len(faces))
    assert [v.tag for v in edit.variants] == ["edit_x_2"] and edit.save_codes
    np.testing.assert_array_equal(edit.variants[0].codes, 2 * res.codes)
    np.testing.assert_array_equal(edit.variants[0].images, faces[:, ::-1])


def _run_calls(shared: SharedInversion, per_call: list[np.ndarray], start_gap: float = 0.0):
    """Each array's faces brought by a call of its own, from threads at once; all calls are inside pending()
    before the first brings its faces, then call k brings them after ``start_gap * k`` seconds."""
    results: list = [None] * len(per_call)
    all_pending = threading.Barrier(len(per_call))

    def call(k):
        try:
            with shared.pending() as c:
                all_pending.wait(10)
                time.sleep(start_gap * k)  # "alignment" of different lengths
                results[k] = c.invert(per_call[k], [f"{k}-{i}" for i in range(len(per_call[k]))])
        except Exception as e:  # noqa: BLE001 - checked by the caller
            results[k] = e

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(per_call))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    return results


@pytest.mark.parametrize("at_once", [1, 2])
def test_calls_share_full_batches_and_get_their_own_faces_back(at_once):
    inverter = RecordingInverter(delay=0.1)
    shared = SharedInversion(inverter, batch_size=4, batches_at_once=at_once)
    per_call = [_faces(n, seed) for seed, n in enumerate((5, 7, 6, 1))]
    results = _run_calls(shared, per_call, start_gap=0.01)
    for result, faces in zip(results, per_call):
        _check(result, faces)
    # 19 faces: four full batches, the last one short; at most ``at_once`` batches at a time, and as many
    # when enough faces wait.
    assert sorted(inverter.sizes, reverse=True) == [4, 4, 4, 4, 3] and inverter.sizes[-1] == 3
    assert inverter.most == at_once


def test_a_short_batch_waits_for_a_call_still_aligning_and_runs_when_it_leaves():
    inverter = RecordingInverter()
    shared = SharedInversion(inverter, batch_size=4)
    aligning, leave = threading.Event(), threading.Event()
    faces = _faces(3, 0)
    got: list = []

    def slow_call():  # a call aligning photos in which it finds no face
        with shared.pending():
            aligning.set()
            leave.wait(10)

    other = threading.Thread(target=slow_call)
    other.start()
    aligning.wait(10)
    first = threading.Thread(target=lambda: got.append(_run_calls(shared, [faces])[0]))
    first.start()
    time.sleep(0.3)
    assert inverter.sizes == [] and not got  # 3 of 4 faces: it waits for the other call's faces
    leave.set()
    first.join(10)
    other.join(10)
    assert inverter.sizes == [3]
    _check(got[0], faces)


def test_an_error_in_a_batch_is_raised_in_every_call_with_faces_in_it():
    inverter = RecordingInverter(fail_on=0)
    shared = SharedInversion(inverter, batch_size=4)
    per_call = [_faces(2, 0), _faces(2, 1)]
    results = _run_calls(shared, per_call)
    assert all(isinstance(r, RuntimeError) and "injected" in str(r) for r in results), results
    # The actor goes on: the next calls are inverted.
    again = [_faces(3, 2), _faces(6, 3)]
    for result, faces in zip(_run_calls(shared, again), again):
        _check(result, faces)


def test_a_call_brings_faces_once_and_at_least_one():
    shared = SharedInversion(RecordingInverter(), batch_size=4)
    with shared.pending() as call:
        with pytest.raises(ValueError, match="at least one face"):
            call.invert(_faces(0, 0), [])
    with shared.pending() as call:
        _check(call.invert(_faces(2, 0), ["a", "b"]), _faces(2, 0))
        with pytest.raises(RuntimeError, match="once"):
            call.invert(_faces(1, 0), ["c"])
