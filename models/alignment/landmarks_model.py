"""dlib's shape_predictor file (the 68-point face landmark model): its arrays, a vectorised reader, a writer (for
tests and timing models), random models of the same shape, and where the 68-point file is installed.

Files are read with models/alignment/formats.py (no unpickling); a truncated or altered file raises
DlibFormatError naming the file and the byte offset.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from .formats import DlibFormatError, DlibReader, DlibWriter, floats_from_parts

__all__ = ["ShapePredictorModel", "read_shape_predictor", "parse_shape_predictor", "serialize_shape_predictor",
           "random_model", "shape_predictor_68_path"]

_FILE_VERSION = 1
# Kinds of the integers in a forest, for the vectorised parse.
_LENGTH, _INDEX, _MANTISSA, _EXPONENT, _ROWS, _COLS = range(6)


@dataclass(frozen=True)
class ShapePredictorModel:
    """The arrays of a dlib shape_predictor, all trees of the same depth.

    initial_shape:   (2 * parts,) float32, the mean shape normalised to the box, x0 y0 x1 y1 ...
    split_index1/2:  (cascades, trees, splits) int64, feature pixels compared at each split node
    split_threshold: (cascades, trees, splits) float32
    leaf_values:     (cascades, trees, splits + 1, 2 * parts) float32
    anchor_index:    (cascades, pixels) int64, the mean-shape landmark each feature pixel hangs on
    anchor_delta:    (cascades, pixels, 2) float32, the pixel's offset from its anchor in the mean shape
    """

    initial_shape: np.ndarray
    split_index1: np.ndarray
    split_index2: np.ndarray
    split_threshold: np.ndarray
    leaf_values: np.ndarray
    anchor_index: np.ndarray
    anchor_delta: np.ndarray

    @property
    def num_parts(self) -> int:
        return self.initial_shape.shape[0] // 2

    @property
    def num_cascades(self) -> int:
        return self.split_index1.shape[0]

    @property
    def num_trees(self) -> int:
        return self.split_index1.shape[1]

    @property
    def num_splits(self) -> int:
        return self.split_index1.shape[2]

    @property
    def num_pixels(self) -> int:
        return self.anchor_index.shape[1]

    def validate(self) -> None:
        """Raises ValueError naming the array that is inconsistent (shape, dtype or index range)."""
        coords = self.initial_shape.shape
        if self.initial_shape.ndim != 1 or coords[0] == 0 or coords[0] % 2:
            raise ValueError(f"initial_shape must be (2 * parts,), got {coords}")
        c, t, s = self.split_index1.shape if self.split_index1.ndim == 3 else (None, None, None)
        if c is None:
            raise ValueError(f"split_index1 must be (cascades, trees, splits), got {self.split_index1.shape}")
        leaves = s + 1
        if leaves & (leaves - 1):
            raise ValueError(f"trees must be complete: {s} splits is not 2**depth - 1")
        p = self.anchor_index.shape[1] if self.anchor_index.ndim == 2 else None
        expected = {
            "split_index2": (c, t, s), "split_threshold": (c, t, s), "leaf_values": (c, t, leaves, coords[0]),
            "anchor_index": (c, p), "anchor_delta": (c, p, 2),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(self, name).shape}")
        # dlib's values are C++ floats: other precisions would not round as dlib does.
        for name in ("initial_shape", "split_threshold", "leaf_values", "anchor_delta"):
            if getattr(self, name).dtype != np.float32:
                raise ValueError(f"{name} must be float32, got {getattr(self, name).dtype}")
        for name in ("split_index1", "split_index2", "anchor_index"):
            if not np.issubdtype(getattr(self, name).dtype, np.integer):
                raise ValueError(f"{name} must be integers, got {getattr(self, name).dtype}")
        for name in ("split_index1", "split_index2"):
            values = getattr(self, name)
            if values.size and (values.min() < 0 or values.max() >= p):
                raise ValueError(f"{name} must index the {p} feature pixels of its cascade")
        if self.anchor_index.size and (self.anchor_index.min() < 0 or self.anchor_index.max() >= coords[0] // 2):
            raise ValueError(f"anchor_index must index the {coords[0] // 2} parts")


def read_shape_predictor(path: str) -> ShapePredictorModel:
    """Parses a dlib shape_predictor file (e.g. shape_predictor_68_face_landmarks.dat).

    The layout (dlib's serialize(shape_predictor)): version 1; the initial shape (a column matrix); the
    forests: a vector of cascades, each a vector of trees, each tree a vector of splits (idx1, idx2,
    threshold) and a vector of leaf column matrices; the anchor indices (a vector per cascade); the anchor
    offsets (a vector of (x, y) per cascade). All integers of the forests are read in one vectorised pass
    and checked against the structure of the first tree: every tree must have the same shape.
    """
    with open(path, "rb") as f:
        data = f.read()
    return parse_shape_predictor(data, path)


def parse_shape_predictor(data: bytes, name: str) -> ShapePredictorModel:
    r = DlibReader(data, name)
    r.expect_int(_FILE_VERSION, "shape_predictor version")
    initial_shape = r.read_matrix(cols=1).reshape(-1)
    coords = initial_shape.size
    if coords == 0 or coords % 2:
        raise r.error(f"initial shape has {coords} values, expected an even, non-zero number")

    forests_at = r.offset
    cascades = r.read_length("number of cascades")
    if cascades == 0:
        raise r.error("no cascades", forests_at)
    # The first tree gives the structure; then every integer of all forests is read at once.
    trees = r.read_length("number of trees")
    splits = r.read_length("number of splits")
    r.read_ints(4 * splits, what="split")
    leaves = r.read_length("number of leaves", expected=splits + 1)
    if leaves & (leaves - 1):
        raise r.error(f"{leaves} leaves: trees must be complete (a power of two)")
    r.offset = forests_at

    # Integers of one tree: splits' length, per split idx1, idx2, mantissa, exponent; leaves' length; per
    # leaf rows, cols, then per value mantissa and exponent.
    tree_kinds = np.concatenate([
        [_LENGTH], np.tile([_INDEX, _INDEX, _MANTISSA, _EXPONENT], splits),
        [_LENGTH], np.tile(np.concatenate([[_ROWS, _COLS], np.tile([_MANTISSA, _EXPONENT], coords)]), leaves),
    ]).astype(np.int8)
    cascade_kinds = np.concatenate([[_LENGTH], np.tile(tree_kinds, trees)]).astype(np.int8)
    values, offsets = r.read_ints(1 + cascades * cascade_kinds.size, what="forest value", return_offsets=True)

    # The structural integers (lengths, matrix sizes) must repeat the first tree's everywhere.
    expected_in_tree = np.where(tree_kinds == _ROWS, -coords, np.where(tree_kinds == _COLS, -1, 0))
    expected_in_tree[0], expected_in_tree[1 + 4 * splits] = splits, leaves
    expected_in_cascade = np.concatenate([[trees], np.tile(expected_in_tree, trees)])
    structural_in_cascade = np.isin(cascade_kinds, (_LENGTH, _ROWS, _COLS))
    positions = (1 + np.arange(cascades)[:, None] * cascade_kinds.size
                 + np.flatnonzero(structural_in_cascade)[None, :]).reshape(-1)
    positions = np.concatenate([[0], positions])
    expected = np.concatenate([[cascades], np.tile(expected_in_cascade[structural_in_cascade], cascades)])
    found = values[positions]
    # dlib writes matrix sizes negated; files of older dlib versions have them positive.
    matrix_size = expected < 0
    found = np.where(matrix_size, -np.abs(found), found)
    mismatch = found != expected
    if mismatch.any():
        i = int(np.argmax(mismatch))
        raise r.error(f"forest structure differs from the first tree: found {int(values[positions[i]])} where "
                      f"{abs(int(expected[i]))} was expected", int(offsets[positions[i]]))
    # Every tree has the same layout: pick the values of each kind by their place in a tree.
    def by_tree(array):
        return array[1:].reshape(cascades, cascade_kinds.size)[:, 1:].reshape(cascades, trees, tree_kinds.size)

    tree_values = by_tree(values)
    exponent = tree_values[:, :, tree_kinds == _EXPONENT]
    bad = (exponent < -(1 << 15)) | (exponent >= (1 << 15))
    if bad.any():
        first = np.unravel_index(np.argmax(bad), bad.shape)
        at = by_tree(offsets)[:, :, tree_kinds == _EXPONENT][first]
        raise r.error(f"float exponent {int(exponent[first])} out of range", int(at))
    floats = floats_from_parts(tree_values[:, :, tree_kinds == _MANTISSA], exponent)
    indices = tree_values[:, :, tree_kinds == _INDEX].reshape(cascades, trees, splits, 2)
    del values, offsets, tree_values

    floats = floats.reshape(cascades, trees, splits + leaves * coords)
    split_threshold = floats[:, :, :splits]
    leaf_values = floats[:, :, splits:].reshape(cascades, trees, leaves, coords)

    r.expect_int(cascades, "number of anchor lists")
    anchors, deltas = [], []
    for _ in range(cascades):
        pixels = r.read_length("number of anchors")
        anchors.append(r.read_ints(pixels, what="anchor index"))
    r.expect_int(cascades, "number of offset lists")
    for c in range(cascades):
        r.read_length("number of offsets", expected=anchors[c].size)
        deltas.append(r.read_floats(2 * anchors[c].size).reshape(-1, 2))
    if not r.at_end():
        raise r.error("unexpected data after the shape predictor")
    if len({a.size for a in anchors}) != 1:
        raise r.error("cascades have different numbers of feature pixels")

    model = ShapePredictorModel(
        initial_shape=initial_shape.astype(np.float32),
        split_index1=np.ascontiguousarray(indices[..., 0]),
        split_index2=np.ascontiguousarray(indices[..., 1]),
        split_threshold=np.ascontiguousarray(split_threshold),
        leaf_values=np.ascontiguousarray(leaf_values),
        anchor_index=np.stack(anchors),
        anchor_delta=np.stack(deltas).astype(np.float32),
    )
    try:
        model.validate()
    except ValueError as e:
        raise DlibFormatError(f"{name}: {e}") from None
    return model


def serialize_shape_predictor(model: ShapePredictorModel) -> bytes:
    """The model in dlib's file format (dlib.shape_predictor loads it); a plain loop, for small models."""
    model.validate()
    w = DlibWriter()
    w.write_int(_FILE_VERSION)
    w.write_matrix(model.initial_shape)
    w.write_int(model.num_cascades)
    for c in range(model.num_cascades):
        w.write_int(model.num_trees)
        for t in range(model.num_trees):
            w.write_int(model.num_splits)
            for i1, i2, threshold in zip(model.split_index1[c, t], model.split_index2[c, t],
                                         model.split_threshold[c, t]):
                w.write_int(i1)
                w.write_int(i2)
                w.write_float(threshold)
            w.write_int(model.num_splits + 1)
            for leaf in model.leaf_values[c, t]:
                w.write_matrix(leaf)
    w.write_int(model.num_cascades)
    for c in range(model.num_cascades):
        w.write_int(model.num_pixels)
        w.write_ints(model.anchor_index[c])
    w.write_int(model.num_cascades)
    for c in range(model.num_cascades):
        w.write_int(model.num_pixels)
        w.write_floats(model.anchor_delta[c])
    return w.getvalue()


def shape_predictor_68_path() -> str:
    """The 68-point model of the face-recognition-models package, located without importing the package
    (its __init__ imports pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package face-recognition-models is not installed")
    return os.path.join(spec.submodule_search_locations[0], "models", "shape_predictor_68_face_landmarks.dat")


def random_model(cascades: int = 15, trees: int = 500, depth: int = 4, pixels: int = 500, parts: int = 68,
                 seed: int = 0, initial_shape=None, leaf_scale: float = 1e-3) -> ShapePredictorModel:
    """Random trees of the given shape with values of the 68-point model's magnitudes.

    ``initial_shape``: the mean shape, (parts, 2) points in the unit square of the face box (where dlib keeps
    it); by default random points, which make the landmarks of every face look rolled. ``leaf_scale``: the
    spread of the leaf values (1e-3, the real model's magnitude, moves points by ~0.09 of the box over the
    7500 trees). A face's mean shape with a small ``leaf_scale`` (1e-5) gives points close to that face in
    every box, eyes level, as real landmarks mostly are. The trees are the seed's whatever the two: the same
    feature pixels, splits and leaves visited, so the same work per face."""
    rng = np.random.default_rng(seed)
    splits = 2 ** depth - 1
    coords = 2 * parts
    # Drawn even when replaced, so that the trees below come from the same random stream.
    mean = np.stack([rng.uniform(0.1, 0.9, parts), rng.uniform(0.1, 0.9, parts)], 1).astype(np.float32)
    if initial_shape is not None:
        given = np.asarray(initial_shape, dtype=np.float32)
        if given.size != coords:
            raise ValueError(f"initial_shape must hold {parts} points, got shape {given.shape}")
        mean = given.reshape(parts, 2)
    return ShapePredictorModel(
        initial_shape=np.ascontiguousarray(mean.reshape(-1)),
        split_index1=rng.integers(0, pixels, (cascades, trees, splits)),
        split_index2=rng.integers(0, pixels, (cascades, trees, splits)),
        split_threshold=rng.normal(0, 30, (cascades, trees, splits)).astype(np.float32),
        leaf_values=rng.normal(0, leaf_scale, (cascades, trees, splits + 1, coords)).astype(np.float32),
        anchor_index=rng.integers(0, parts, (cascades, pixels)),
        anchor_delta=rng.normal(0, 0.05, (cascades, pixels, 2)).astype(np.float32),
    )
