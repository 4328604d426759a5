"""models.alignment.formats: dlib's portable format, read vectorised, and errors that name the file and offset.

dlib itself is the reference for the format: files written here are read back by dlib (see
test_landmarks.py, which loads synthetic shape predictors in dlib.shape_predictor), and the 68-point model
written by dlib is parsed in test_landmarks.py. Here: the reader against dlib's documented encoding, the
vectorised chain search on data that defeats its guesses, and malformed input.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import dlib
import numpy as np
import pytest
from PIL import Image

from models.alignment.detector import BUNDLED_DETECTOR_FILE
from models.alignment.formats import (DetectorFileError, DlibFormatError, DlibReader, DlibWriter, _parse_detector,
                                      detector_with_max_levels, encode_float, encode_int)
from helpers.paths import DATA_DIR


def _reference_encode_int(value: int) -> bytes:
    # The encoding as dlib's serialize.h documents it, written independently of encode_int.
    magnitude = abs(value)
    payload = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(payload) | (0x80 if value < 0 else 0)]) + payload


@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, 255, 256, -256, 65535, 2**31 - 1, -2**31, 2**40 + 3,
                                   2**63 - 1, -(2**63 - 1)])
def test_int_encoding_matches_dlib_format(value):
    assert encode_int(value) == _reference_encode_int(value)
    r = DlibReader(encode_int(value), "one.dat")
    assert r.read_int() == value
    assert r.at_end()


def test_float_encoding_is_mantissa_and_exponent():
    # 0.75 = 3 * 2**-2 once dlib shifts off the mantissa's zero low bytes: frexp gives 0.75 * 2**0,
    # mantissa 0.75 * 2**24 = 0xC00000 -> 0xC0 after two zero bytes, exponent -24 + 16 = -8.
    assert encode_float(0.75) == bytes([0x01, 0xC0, 0x81, 0x08])
    assert DlibReader(encode_float(0.75), "f.dat").read_float() == np.float32(0.75)
    specials = DlibReader(encode_float(np.inf) + encode_float(-np.inf) + encode_float(np.nan), "s.dat")
    values = specials.read_floats(3)
    assert values[0] == np.inf and values[1] == -np.inf and np.isnan(values[2])


def test_float_rounds_mantissa_to_float32_first():
    # A double's 53-bit mantissa read into a float: dlib computes ldexp((float)mantissa, exponent).
    mantissa, exponent = (1 << 52) + (1 << 28) + 1, -52     # 1 + 2**-24 + 2**-52: rounds up in float32
    data = encode_int(mantissa) + encode_int(exponent)
    expected = np.ldexp(np.float32(mantissa), exponent)
    assert DlibReader(data, "d.dat").read_float() == expected
    assert DlibReader(data, "d.dat").read_float(dtype=np.float64) == 1 + 2.0**-24 + 2.0**-52


@pytest.mark.parametrize("count", [3, 64, 65, 5000, 300_000])
def test_read_ints_vectorised_equals_values_written(count):
    rng = np.random.default_rng(count)
    # Mixed magnitudes so that values take 1 to 8 bytes and parses started at wrong offsets diverge.
    bits = rng.integers(0, 63, count)
    values = (rng.integers(0, 2**62, count) >> (62 - bits)) * rng.choice([-1, 1], count)
    w = DlibWriter()
    w.write_ints(values)
    w.write_int(-7)
    r = DlibReader(w.getvalue(), "ints.dat")
    np.testing.assert_array_equal(r.read_ints(count), values)
    assert r.read_int() == -7 and r.at_end()


def test_chain_search_when_parses_never_merge():
    # Every byte is 0x02: a value is 3 bytes from any starting byte, so parses that start out of phase never
    # meet the true one; the block guesses are wrong and must be corrected block after block.
    n = 3000
    data = bytes([0x02]) * (3 * n)
    r = DlibReader(data, "phase.dat")
    r.offset = 1
    values = r.read_ints(n - 1)
    assert (values == 0x0202).all() and r.offset == 1 + 3 * (n - 1)


def test_read_floats_vectorised():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(10_000), rng.uniform(-1e30, 1e30, 100), [0.0, -0.0, 1e-40]])
    values = values.astype(np.float32)
    w = DlibWriter()
    w.write_floats(values)
    np.testing.assert_array_equal(DlibReader(w.getvalue(), "f.dat").read_floats(values.size), values)


def test_matrix_and_string():
    w = DlibWriter()
    m = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    w.write_matrix(m)
    w.write_string(b"dlib")
    r = DlibReader(w.getvalue(), "m.dat")
    np.testing.assert_array_equal(r.read_matrix(), m)
    assert r.read_string() == b"dlib" and r.at_end()


def _offset_in(error: DlibFormatError) -> int:
    message = str(error)
    return int(message.split("at byte offset ")[1].split()[0])


@pytest.mark.parametrize("count", [10, 1000])
def test_truncated_data_names_file_and_offset(count):
    w = DlibWriter()
    w.write_ints(np.arange(count) * 1000)   # 1-2 magnitude bytes each
    data = w.getvalue()
    for cut in (1, 2, 3, len(data) // 2):
        r = DlibReader(data[:-cut], "cut.dat")
        with pytest.raises(DlibFormatError) as e:
            r.read_ints(count)
        assert "cut.dat" in str(e.value) and "truncated" in str(e.value)
        assert 0 < _offset_in(e.value) <= len(data) - cut
        assert r.offset == 0   # a failed read consumes nothing


def test_invalid_control_byte_is_named():
    w = DlibWriter()
    w.write_ints(np.arange(200))
    data = bytearray(w.getvalue())
    bad_at = 2 * 100   # value 100 starts here (values < 256 take two bytes)
    data[bad_at] = 0x30 | 0x01   # reserved bits set
    with pytest.raises(DlibFormatError, match=rf"bad\.dat: invalid control byte 0x31 .* at byte offset {bad_at}"):
        DlibReader(bytes(data), "bad.dat").read_ints(200)
    data[bad_at] = 0x09   # nine magnitude bytes: more than any integer has
    with pytest.raises(DlibFormatError, match=rf"at byte offset {bad_at}"):
        DlibReader(bytes(data), "bad.dat").read_ints(200)


def test_exponent_wider_than_int16_is_refused():
    data = encode_int(3) + encode_int(1 << 20)
    with pytest.raises(DlibFormatError, match=r"float exponent .* at byte offset 2"):
        DlibReader(data, "e.dat").read_float()


def test_old_text_float_format_is_refused():
    with pytest.raises(DlibFormatError, match="old text format"):
        DlibReader(b"1.5 ", "old.dat").read_float()


def test_failed_matrix_read_consumes_nothing():
    w = DlibWriter()
    w.write_matrix(np.ones((3, 3), dtype=np.float32))
    r = DlibReader(w.getvalue()[:-2], "m.dat")
    with pytest.raises(DlibFormatError, match="truncated"):
        r.read_matrix()
    assert r.offset == 0


def test_absurd_length_is_refused_before_allocating():
    data = encode_int(-(10**12)) + encode_int(-1) + encode_float(1.0)
    with pytest.raises(DlibFormatError, match=r"m\.dat: truncated or corrupt: matrix .* at byte offset 0"):
        DlibReader(data, "m.dat").read_matrix()


@pytest.mark.parametrize("levels", [1, 3, 50])
def test_detector_with_max_levels_changes_that_field_alone(levels):
    with open(BUNDLED_DETECTOR_FILE, "rb") as f:
        data = f.read()
    rewritten = detector_with_max_levels(data, levels, BUNDLED_DETECTOR_FILE)
    before = _parse_detector(DlibReader(data, "before"))
    after = _parse_detector(DlibReader(rewritten, "after"))
    assert before.max_pyramid_levels != levels and after.max_pyramid_levels == levels
    for field in dataclasses.fields(before):
        if field.name != "max_pyramid_levels":
            np.testing.assert_array_equal(getattr(after, field.name), getattr(before, field.name))
    # dlib reads the rewritten file, and with one level it finds only faces at the image's own scale.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "d.svm")
        with open(path, "wb") as f:
            f.write(rewritten)
        detector = dlib.fhog_object_detector(path)
        image = np.asarray(Image.open(os.path.join(DATA_DIR, "grace_hopper.jpg")).convert("RGB"))
        full = dlib.get_frontal_face_detector()(image, 0)
        limited = detector(image, 0)
        assert len(full) >= 1
        assert (len(limited) == len(full)) if levels == 50 else len(limited) <= len(full)


def test_detector_with_max_levels_refuses_a_bad_file():
    with open(BUNDLED_DETECTOR_FILE, "rb") as f:
        data = f.read()
    with pytest.raises(DetectorFileError, match="truncated|end"):
        detector_with_max_levels(data[:-7], 1, "cut.svm")
    with pytest.raises(ValueError, match="positive"):
        detector_with_max_levels(data, 0)
