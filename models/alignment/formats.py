"""dlib's file formats: its portable serialization (a reader, vectorised with numpy, and a writer, for tests) and
the file of its frontal face detector (``object_detector<scan_fhog_pyramid<pyramid_down<6>>>``, as
``detector.save(path)`` writes it). The shape predictor's file is read in models/alignment/landmarks_model.py.

The portable serialization:

dlib writes every integer as a control byte followed by its magnitude: the low nibble of the control byte is
the number of little-endian magnitude bytes (1..8), bit 0x80 marks a negative signed value, bits 0x70 are
always zero. A float or double is written as two such integers, an int64 mantissa and an int16 exponent,
value = mantissa * 2**exponent (exponents 32000, 32001, 32002 stand for inf, -inf, nan). A dlib::matrix is
its row and column counts (written negated by current dlib) followed by its values row-major; a std::vector
or std::string is its length followed by its elements.

Model files hold tens of millions of such values. Because each value's length is in its own control byte,
the values' offsets form a chain that a byte-by-byte Python loop would take minutes to follow; `read_ints`
finds the chain with numpy (see `_chain_offsets`) and decodes all values at once. Nothing is unpickled or
executed: the reader only ever produces integers, floats and bytes, and every malformed or truncated value
raises `DlibFormatError` naming the file and the byte offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# float_details' special exponents (dlib/float_details.h).
_EXPONENT_INF = 32000
_EXPONENT_NINF = 32001
_EXPONENT_NAN = 32002

_MAX_INT_BYTES = 8
# Below this many values a plain loop is faster than setting up the vectorised chain search.
_SCALAR_CHAIN_LIMIT = 64
# Bytes parsed before each block to guess its entry state (parses merge within ~100 bytes in model files).
_WARM_UP_BYTES = 128
# _BYTE_MASKS[k] keeps the low k bytes of a 64-bit word.
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


class DlibFormatError(ValueError):
    """A file is not valid dlib serialization (or not the structure expected); the message names the file
    and the byte offset of the offending value."""


class DlibReader:
    """Sequential reader over the bytes of one dlib-serialized file.

    `offset` is the byte position of the next value. Every read either returns the decoded values and
    advances `offset` past them, or raises `DlibFormatError` and leaves `offset` unchanged.
    """

    def __init__(self, data: bytes, name: str):
        self._size = len(data)
        # 8 zero bytes of padding let every value's magnitude be read as one unaligned 64-bit word.
        self._buf = np.zeros(self._size + 8, dtype=np.uint8)
        self._buf[:self._size] = np.frombuffer(memoryview(data), dtype=np.uint8)
        self._words = np.ndarray(shape=(self._size + 1,), dtype="<u8", buffer=self._buf, strides=(1,))
        self.name = name
        self.offset = 0

    def __len__(self) -> int:
        return self._size

    def error(self, message: str, offset: int | None = None) -> DlibFormatError:
        """A DlibFormatError for this file at `offset` (default: the current offset)."""
        at = self.offset if offset is None else offset
        return DlibFormatError(f"{self.name}: {message} at byte offset {at} (file size {self._size} bytes)")

    def at_end(self) -> bool:
        return self.offset >= self._size

    # -- integers ------------------------------------------------------------------------------------------

    def read_int(self, max_bytes: int = _MAX_INT_BYTES, what: str = "integer") -> int:
        return int(self.read_ints(1, max_bytes=max_bytes, what=what)[0])

    def read_unsigned(self, what: str = "length") -> int:
        at = self.offset
        value = self.read_int(what=what)
        if value < 0:
            self.offset = at
            raise self.error(f"negative {what} {value}", at)
        return value

    def read_ints(self, n: int, max_bytes: int = _MAX_INT_BYTES, what: str = "integer",
                  return_offsets: bool = False):
        """The next `n` integers as an int64 array. `max_bytes` is the size of the C++ type dlib reads them
        into (4 for an int, 2 for a float's exponent): a value with more magnitude bytes is an error, as in
        dlib. With `return_offsets`, also each value's byte offset (for error messages about values that
        are well-formed but wrong)."""
        offsets = self._offsets(n)
        values = self._decode(offsets, max_bytes, what)
        self._check_complete(offsets, n, what)
        if n:
            self.offset = self._end_of(offsets[-1])
        return (values, offsets) if return_offsets else values

    def expect_int(self, expected: int, what: str) -> None:
        """Reads one integer and raises unless it equals `expected` (a version number, a fixed size)."""
        at = self.offset
        value = self.read_int(what=what)
        if value != expected:
            self.offset = at
            raise self.error(f"{what} is {value}, expected {expected}", at)

    # -- floating point ------------------------------------------------------------------------------------

    def read_float(self, dtype=np.float32) -> float:
        return self.read_floats(1, dtype=dtype)[0]

    def read_floats(self, n: int, dtype=np.float32) -> np.ndarray:
        """The next `n` floating point values, converted as dlib converts them into `dtype` (float32 for a
        C++ float: the mantissa is rounded to float32 first, then scaled by 2**exponent, like
        std::ldexp((float)mantissa, exponent))."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"read_floats: dtype must be float32 or float64, got {dtype}")
        offsets = self._offsets(2 * n)
        mantissa_at, exponent_at = offsets[0::2], offsets[1::2]
        # dlib takes a control byte with any of bits 0x70 set as the start of its old ASCII float format.
        old_format = (self._buf[mantissa_at] & 0x70) != 0
        if old_format.any():
            raise self.error("float in dlib's old text format (not supported)",
                             int(mantissa_at[np.argmax(old_format)]))
        mantissa = self._decode(mantissa_at, _MAX_INT_BYTES, "float mantissa")
        exponent = self._decode(exponent_at, 2, "float exponent")
        self._check_complete(offsets, 2 * n, "float")
        values = floats_from_parts(mantissa, exponent, dtype)
        if n:
            self.offset = self._end_of(offsets[-1])
        return values

    # -- composite values ----------------------------------------------------------------------------------

    def read_matrix(self, dtype=np.float32, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """A dlib::matrix of floats as a (rows, cols) array; `rows`/`cols`, when given, must match."""
        start = self.offset
        dims = self.read_ints(2, what="matrix size")
        nr, nc = abs(int(dims[0])), abs(int(dims[1]))
        if (rows is not None and nr != rows) or (cols is not None and nc != cols):
            self.offset = start
            raise self.error(f"matrix is {nr}x{nc}, expected {rows if rows is not None else nr}x"
                             f"{cols if cols is not None else nc}", start)
        self._check_count(nr * nc, 4, start, "matrix")
        try:
            values = self.read_floats(nr * nc, dtype=dtype)
        except DlibFormatError:
            self.offset = start
            raise
        return values.reshape(nr, nc)

    def read_string(self) -> bytes:
        start = self.offset
        size = self.read_unsigned(what="string length")
        if self.offset + size > self._size:
            self.offset = start
            raise self.error(f"truncated: string of {size} bytes", start)
        data = self._buf[self.offset:self.offset + size].tobytes()
        self.offset += size
        return data

    def read_length(self, what: str, expected: int | None = None) -> int:
        """A container length (std::vector size); with `expected`, it must equal that."""
        at = self.offset
        size = self.read_unsigned(what=what)
        if expected is not None and size != expected:
            self.offset = at
            raise self.error(f"{what} is {size}, expected {expected}", at)
        self._check_count(size, 2, at, what)
        return size

    # -- internals ---------------------------------------------------------------------------------------

    def _check_count(self, count: int, min_bytes_each: int, at: int, what: str) -> None:
        # A count the rest of the file cannot hold is corrupt: refuse it before allocating for it.
        left = self._size - self.offset
        if count * min_bytes_each > left:
            self.offset = at
            raise self.error(f"truncated or corrupt: {what} of {count} values does not fit in the "
                             f"{left} bytes left", at)

    def _end_of(self, offset) -> int:
        return int(offset) + 1 + int(self._buf[offset] & 0x0F)

    def _offsets(self, n: int) -> np.ndarray:
        """Offsets of the next n values' control bytes; fewer when the file ends first."""
        if n < 0:
            raise ValueError(f"cannot read {n} values")
        if n > _SCALAR_CHAIN_LIMIT:
            return _chain_offsets(self._buf, self.offset, self._size, n)
        offsets = []
        pos = self.offset
        while len(offsets) < n and pos < self._size:
            offsets.append(pos)
            pos += 1 + int(self._buf[pos] & 0x0F)
        return np.array(offsets, dtype=np.int64)

    def _check_complete(self, offsets: np.ndarray, n: int, what: str) -> None:
        if offsets.size < n:
            at = self._end_of(offsets[-1]) if offsets.size else self.offset
            raise self.error(f"truncated: {n - offsets.size} of {n} values ({what}) missing", min(at, self._size))
        if n and self._end_of(offsets[-1]) > self._size:
            raise self.error(f"truncated: {what} cut off", int(offsets[-1]))

    def _decode(self, offsets: np.ndarray, max_bytes: int, what: str) -> np.ndarray:
        control = self._buf[offsets]
        sizes = control & 0x0F
        bad = ((control & 0x70) != 0) | (sizes == 0) | (sizes > max_bytes)
        if bad.any():
            i = int(np.argmax(bad))
            raise self.error(f"invalid control byte 0x{int(control[i]):02x} for {what} "
                             f"(at most {max_bytes} magnitude bytes)", int(offsets[i]))
        magnitude = self._words[offsets + 1] & _BYTE_MASKS[sizes]
        too_large = magnitude >= np.uint64(1 << 63)
        if too_large.any():
            raise self.error(f"{what} out of range", int(offsets[np.argmax(too_large)]))
        values = magnitude.view(np.int64)
        negative = (control & 0x80) != 0
        np.negative(values, out=values, where=negative)
        return values


def floats_from_parts(mantissa: np.ndarray, exponent: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Floating point values from their serialized (mantissa, exponent) integers, as dlib's float_details
    converts them: std::ldexp((T)mantissa, exponent), the special exponents giving inf, -inf and nan."""
    with np.errstate(over="ignore", under="ignore"):
        values = np.ldexp(mantissa.astype(dtype), exponent.astype(np.int32)).astype(dtype, copy=False)
    if (exponent >= _EXPONENT_INF).any():
        values[exponent == _EXPONENT_INF] = np.inf
        values[exponent == _EXPONENT_NINF] = -np.inf
        values[exponent >= _EXPONENT_NAN] = np.nan
    return values


def _chain_offsets(buf: np.ndarray, start: int, end: int, n: int) -> np.ndarray:
    """Offsets of the first `n` values of the chain that starts at `start` (fewer if `end` comes first).

    Each value's offset is the previous offset + 1 + (its control byte & 0x0F): a strictly sequential
    chain. It is followed as a tiny automaton whose state is the number of payload bytes still to skip
    (0: this byte is a control byte). The bytes are cut into blocks that are scanned side by side (one numpy
    step per byte position over all blocks at once), each block entered with a guessed state. A block's true
    entry state is the state in which the block before it ends; blocks entered with a wrong guess are
    scanned again with the corrected state until every block's entry equals its predecessor's exit. Parses
    started at different offsets merge within a few values, so one or two rounds are the rule; whatever the data,
    each round fixes at least the first wrong block, so the result is always the exact chain.
    """
    span = int(min(end - start, 9 * n))
    if span <= 0:
        return np.empty(0, dtype=np.int64)
    length = 1024 if span > 1 << 20 else 64
    blocks = -(-span // length)
    nibbles = np.zeros(blocks * length, dtype=np.uint8)
    np.bitwise_and(buf[start:start + span], 0x0F, out=nibbles[:span])
    # Row j holds byte j of every block, so that one scan step reads contiguous memory (torch transposes
    # several times faster than numpy).
    by_position = torch.from_numpy(nibbles.reshape(blocks, length)).t().contiguous().numpy()
    is_control = np.empty((length, blocks), dtype=bool)
    one = np.uint8(1)
    # Guess each block's entry state by parsing the last bytes of the block before it from an arbitrary
    # state: such a parse has almost always merged with the true one by the block's end.
    entry = np.zeros(blocks, dtype=np.uint8)
    guess = np.zeros(blocks - 1, dtype=np.uint8)
    for j in range(length - min(_WARM_UP_BYTES, length), length):
        guess = np.where(guess == 0, by_position[j, :-1], guess - one)
    entry[1:] = guess
    todo = np.arange(blocks)
    while todo.size:
        rows = by_position if todo.size == blocks else by_position[:, todo]
        state = entry[todo].copy()
        marks = np.empty((length, todo.size), dtype=bool)
        for j in range(length):
            np.equal(state, 0, out=marks[j])
            state = np.where(marks[j], rows[j], state - one)
        if todo.size == blocks:
            is_control = marks
            exit_state = state
        else:
            is_control[:, todo] = marks
            exit_state[todo] = state
        wrong = np.flatnonzero(exit_state[:-1] != entry[1:]) + 1
        entry[wrong] = exit_state[wrong - 1]
        todo = wrong
    in_order = torch.from_numpy(is_control).t().contiguous().numpy().reshape(-1)[:span]
    return np.flatnonzero(in_order)[:n] + start


# -- writing (tests build small and malformed files with it; dlib itself reads them back) ------------------

def encode_int(value: int) -> bytes:
    """One integer in dlib's format (the same bytes dlib's pack_int writes)."""
    value = int(value)
    negative = value < 0
    magnitude = -value if negative else value
    if magnitude >= 1 << 64:
        raise OverflowError(f"{value} does not fit in 8 bytes")
    payload = bytearray()
    while True:
        payload.append(magnitude & 0xFF)
        magnitude >>= 8
        if magnitude == 0:
            break
    return bytes([len(payload) | (0x80 if negative else 0)]) + bytes(payload)


def encode_float(value: float, digits: int = 24) -> bytes:
    """A float (digits=24) or double (digits=53) as dlib's float_details writes it."""
    value = float(value)
    if math.isnan(value):
        return encode_int(0) + encode_int(_EXPONENT_NAN)
    if math.isinf(value):
        return encode_int(0) + encode_int(_EXPONENT_INF if value > 0 else _EXPONENT_NINF)
    fraction, exponent = math.frexp(value)
    mantissa = int(fraction * (1 << digits))
    exponent -= digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return encode_int(mantissa) + encode_int(exponent)


class DlibWriter:
    """Accumulates values in dlib's format; `getvalue()` returns the bytes."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write_int(self, value: int) -> None:
        self._parts.append(encode_int(value))

    def write_ints(self, values) -> None:
        self._parts.extend(encode_int(v) for v in np.asarray(values).ravel().tolist())

    def write_float(self, value: float) -> None:
        self._parts.append(encode_float(value))

    def write_floats(self, values) -> None:
        self._parts.extend(encode_float(v) for v in np.asarray(values, dtype=np.float32).ravel().tolist())

    def write_matrix(self, values) -> None:
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 1:
            values = values[:, None]
        self.write_int(-values.shape[0])
        self.write_int(-values.shape[1])
        self.write_floats(values)

    def write_string(self, data: bytes) -> None:
        self.write_int(len(data))
        self._parts.append(bytes(data))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


# -- the detector file ---------------------------------------------------------------------------------------
# dlib's frontal face detector: fHOG of 8-pixel cells with 31 planes (18 signed and 9 unsigned orientations,
# 4 texture planes). The file holds the cell size (only 8 is supported) and the filters' planes.
CELL_SIZE = 8
NUM_PLANES = 31


class DetectorFileError(DlibFormatError):
    """The detector file is not what dlib's frontal face detector saves; names the file and byte offset."""


@dataclass(frozen=True)
class HogDetectorModel:
    """What dlib's ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>`` file holds."""
    cell_size: int
    padding: int
    window_width: int
    window_height: int
    max_pyramid_levels: int
    min_level_width: int
    min_level_height: int
    iou_thresh: float
    covered_thresh: float
    filters: np.ndarray      # (n_filters, NUM_PLANES, fhog height, fhog width) float64
    thresholds: np.ndarray   # (n_filters,) float64: the bias (last weight) of each filter

    @property
    def fhog_window(self) -> tuple[int, int]:
        return self.filters.shape[2], self.filters.shape[3]


def _c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _fhog_window_size(cell_size: int, padding: int, width: int, height: int) -> tuple[int, int]:
    # scan_fhog_pyramid::compute_fhog_window_size: the window centred at 0, mapped by image_to_fhog with
    # filter padding 1, grown by `padding` cells on every side.
    left, top = -(width // 2), -(height // 2)
    right, bottom = left + width - 1, top + height - 1

    def to_fhog(v: int) -> int:
        return _c_div(v - 1, cell_size) - 1

    return (to_fhog(bottom) - to_fhog(top) + 1 + 2 * padding, to_fhog(right) - to_fhog(left) + 1 + 2 * padding)


def read_detector_file(path: str) -> HogDetectorModel:
    """Parse ``dlib.fhog_object_detector.save(path)`` output (object_detector version 2). Raises
    DetectorFileError (naming the file and the byte offset) on a truncated or altered file."""
    with open(path, "rb") as f:
        data = f.read()
    reader = DlibReader(data, path)
    try:
        return _parse_detector(reader)
    except DetectorFileError:
        raise
    except DlibFormatError as e:
        raise DetectorFileError(str(e)) from None


def detector_with_max_levels(data: bytes, max_levels: int, name: str = "detector file") -> bytes:
    """The bytes of a detector file (what ``detector.save`` writes) with its ``max_pyramid_levels`` replaced:
    dlib's detector saved so, a run scans at most ``max_levels`` levels of its pyramid. The whole file is parsed
    (DetectorFileError on a bad one) and only that field's bytes change."""
    if int(max_levels) != max_levels or max_levels < 1:
        raise ValueError(f"max_levels must be a positive integer, got {max_levels!r}")
    spans: dict[str, tuple[int, int]] = {}
    try:
        _parse_detector(DlibReader(data, name), spans)
    except DetectorFileError:
        raise
    except DlibFormatError as e:
        raise DetectorFileError(str(e)) from None
    start, end = spans["max_pyramid_levels"]
    return data[:start] + encode_int(int(max_levels)) + data[end:]


def _parse_detector(r: DlibReader, spans: dict[str, tuple[int, int]] | None = None) -> HogDetectorModel:
    """The model in ``r``; ``spans``, when given, receives each small integer field's byte span by name."""
    def fail(message: str, at: int) -> DetectorFileError:
        return DetectorFileError(str(r.error(message, at)))

    def small_int(what: str, low: int, high: int) -> int:
        at = r.offset
        value = r.read_int(what=what)
        if not low <= value <= high:
            raise fail(f"{what} is {value}, expected {low}..{high}", at)
        if spans is not None:
            spans[what] = (at, r.offset)
        return value

    def read_double(what: str, low: float, high: float) -> float:
        at = r.offset
        value = float(r.read_floats(1, dtype=np.float64)[0])
        if not low <= value <= high:  # also rejects nan
            raise fail(f"{what} is {value}, expected {low}..{high}", at)
        return value

    r.expect_int(2, "object_detector version")
    r.expect_int(1, "scan_fhog_pyramid version")
    # The scanner's cached feature pyramid: dlib saves a copy_configuration() of it, always empty.
    r.expect_int(0, "feature pyramid max_size")
    r.expect_int(0, "feature pyramid size")
    at = r.offset
    cell_size = r.read_int(what="cell_size")
    if cell_size != CELL_SIZE:
        raise fail(f"cell_size is {cell_size}: only dlib's cell size {CELL_SIZE} is supported", at)
    padding = small_int("padding", 0, 16)
    window_width = small_int("window width", 1, 4096)
    window_height = small_int("window height", 1, 4096)
    max_levels = small_int("max_pyramid_levels", 1, 1 << 20)
    min_width = small_int("min_pyramid_layer_width", 1, 1 << 20)
    min_height = small_int("min_pyramid_layer_height", 1, 1 << 20)
    read_double("nuclear_norm_regularization_strength", 0.0, math.inf)
    fhog_h, fhog_w = _fhog_window_size(cell_size, padding, window_width, window_height)
    dims = fhog_h * fhog_w * NUM_PLANES
    r.expect_int(dims, "number of dimensions")
    iou = read_double("overlap iou threshold", 0.0, 1.0)
    covered = read_double("overlap percent-covered threshold", 0.0, 1.0)
    n_filters = small_int("number of filters", 1, 64)
    filters, thresholds = [], []
    for i in range(n_filters):
        at = r.offset
        size = r.read_ints(2, what="weight vector size")
        if abs(int(size[0])) != dims + 1 or abs(int(size[1])) != 1:
            raise fail(f"weight vector {i} is {abs(int(size[0]))}x{abs(int(size[1]))}, expected {dims + 1}x1",
                       at)
        at = r.offset
        w = r.read_floats(dims + 1, dtype=np.float64)
        if not np.isfinite(w).all():
            raise fail(f"weight vector {i} has a value that is not finite", at)
        filters.append(w[:dims].reshape(NUM_PLANES, fhog_h, fhog_w))
        thresholds.append(w[dims])
    if not r.at_end():
        raise fail("unexpected data after the last weight vector", r.offset)
    return HogDetectorModel(cell_size, padding, window_width, window_height, max_levels, min_width, min_height,
                            iou, covered, np.stack(filters), np.array(thresholds, dtype=np.float64))
