"""dlib's shape_predictor (the 68-point face landmark model) in PyTorch, batched over faces, equal to dlib.

    from models.landmarks import ShapePredictor
    sp = ShapePredictor(path_to_shape_predictor_68_face_landmarks_dat, device="cuda")   # or "cpu"
    points = sp.predict(images, boxes)
    # images: HxWx3 uint8 RGB (numpy arrays, or torch tensors on any device); boxes: per image a list of
    # (left, top, right, bottom); points[i]: (n_i, 68, 2) int64 array, dlib's part coordinates.

The model is a cascade of regression-tree forests (Kazemi and Sullivan 2014) as dlib implements it in
dlib/image_processing/shape_predictor.h. Starting from the mean shape, each cascade
  1. fits the similarity transform from the mean shape to the current shape (Umeyama; dlib works in double
     and keeps only the 2x2 part, as float32);
  2. places its feature pixels: anchor landmark of the current shape + transformed offset, in float32,
     mapped into the face box by dlib's box transform (in double, see _UNIT_SQUARE_PINV), rounded with
     floor(v + 0.5); a pixel's value is the grey level (r + g + b) // 3, or 0 outside the image;
  3. runs every tree: node n goes to 2n+1 when f[i1] - f[i2] > threshold, else to 2n+2;
  4. adds each tree's leaf (one value per coordinate) to the current shape, tree after tree, in float32.
The parts are the final shape mapped into the box and rounded like the pixels.

Equality with dlib rests on doing the same float32 and double operations in the same order:
  * products and sums are separate elementwise operations, never contracted into fused multiply-adds (eager
    PyTorch never fuses them; the Triton kernels below contain no floating-point multiplication);
  * the 500 leaves of a cascade are added to the shape one tree at a time: a reduction in any other order
    (as torch.sum or a GPU tree reduction would do) flips low bits, a pixel rounds the other way and the
    cascade diverges by several pixels;
  * the box transform is dlib's own, errors included: dlib fits it through an SVD-based pseudo-inverse
    whose last-bit errors decide how points exactly halfway between pixels round (they do occur on real
    faces); the nine constants it uses are reproduced bit for bit, and the mapping is done in double with
    dlib's operation order;
  * the only operations that do not repeat dlib's exactly are the double-precision sums of the similarity
    fit (68 points, in another order; no products are fused): their results differ from dlib's in the last
    bits of a double and are then rounded to float32, which hides such a difference unless a value lies
    within about 1e-16 relative of a float32 rounding boundary.

On CUDA two Triton kernels (when Triton is installed) replace the launch-bound parts: one evaluates all
trees of a cascade for all faces, one adds the leaves, one program per (face, block of coordinates) looping
over the trees in order. Elsewhere (CPU, or `use_triton=False`) the same steps run as torch operations: the
trees vectorised, the leaves as one vectorised add per tree. Both give identical bits; the benchmark checks
it on the GPU, tests/test_triton_kernels_interpreted.py under Triton's interpreter on CPU.

Model files are read with models.dlib_serialize (no unpickling); a truncated or altered file raises
DlibFormatError naming the file and the byte offset.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from models.dlib_serialize import DlibFormatError, DlibReader, DlibWriter, floats_from_parts

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

__all__ = ["ShapePredictor", "ShapePredictorModel", "DlibFormatError", "read_shape_predictor",
           "parse_shape_predictor", "serialize_shape_predictor", "random_model", "shape_predictor_68_path"]

_FILE_VERSION = 1

# dlib maps the normalised shape into a box with the affine transform from the unit square's corners
# (0,0), (1,0), (1,1) to the box's top-left, top-right and bottom-right: m = Q * pinv(P), where P holds the
# square's corners as homogeneous columns [[0,1,1],[0,0,1],[1,1,1]] and Q the box's corners
# [[l,r,r],[t,t,b]]. P's exact inverse has integer entries, but dlib takes pinv(P) from its SVD
# (Golub-Reinsch, svd4 in dlib/matrix/matrix_la.h), whose result is off by a few units in the last place;
# those errors decide which way a point lying exactly halfway between two pixels rounds, which happens
# often enough on real faces to matter. These are the nine doubles dlib computes (obtained by running the
# same algorithm with the same operation order in double); tests/test_landmarks.py checks them against
# dlib on thousands of boxes with shapes placed on half pixels, where the exact inverse disagrees with dlib
# almost every time.
_UNIT_SQUARE_PINV = np.array([
    [float.fromhex("-0x1.0000000000001p+0"), float.fromhex("-0x1.0000000000000p-52"),
     float.fromhex("0x1.0000000000001p+0")],
    [float.fromhex("0x1.ffffffffffffdp-1"), float.fromhex("-0x1.ffffffffffffbp-1"),
     float.fromhex("0x1.8000000000000p-53")],
    [0.0, float.fromhex("0x1.0000000000001p+0"), float.fromhex("0x1.8000000000000p-54")],
], dtype=np.float64)


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


# Kinds of the integers in a forest, for the vectorised parse.
_LENGTH, _INDEX, _MANTISSA, _EXPONENT, _ROWS, _COLS = range(6)


def shape_predictor_68_path() -> str:
    """The 68-point model of the face-recognition-models package, located without importing the package
    (its __init__ imports pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package face-recognition-models is not installed")
    return os.path.join(spec.submodule_search_locations[0], "models", "shape_predictor_68_face_landmarks.dat")


class ShapePredictor:
    """dlib's shape_predictor on a torch device; `predict` is batched over all faces of all images."""

    def __init__(self, path: str, device="cpu", use_triton: bool | None = None, cuda_graphs: bool | None = None):
        """`use_triton`: the Triton kernels (default: on CUDA when Triton is installed). `cuda_graphs`: on
        CUDA, replay each batch size's (rounded up to a power of two) launches as one captured CUDA graph,
        which removes the per-launch CPU cost that bounds small batches. Default: on CUDA with the Triton
        kernels (H200, 256 faces: 49k faces/s against 17.5k without graphs, identical points; BENCHMARKS.md)."""
        self._setup(read_shape_predictor(path), device, use_triton, cuda_graphs)

    @classmethod
    def from_model(cls, model: ShapePredictorModel, device="cpu", use_triton: bool | None = None,
                   cuda_graphs: bool | None = None) -> "ShapePredictor":
        model.validate()
        self = cls.__new__(cls)
        self._setup(model, device, use_triton, cuda_graphs)
        return self

    @classmethod
    def random(cls, cascades: int = 15, trees: int = 500, depth: int = 4, pixels: int = 500, parts: int = 68,
               seed: int = 0, device="cpu", use_triton: bool | None = None, cuda_graphs: bool | None = None,
               initial_shape=None, leaf_scale: float = 1e-3) -> "ShapePredictor":
        """A predictor of the given shape (the 68-point model's by default) with random values, for timing
        where the model file is not available; its landmarks mean nothing, or stay near ``initial_shape``
        with a small ``leaf_scale`` (see random_model)."""
        return cls.from_model(random_model(cascades, trees, depth, pixels, parts, seed, initial_shape, leaf_scale),
                              device, use_triton, cuda_graphs)

    def _setup(self, model: ShapePredictorModel, device, use_triton: bool | None, cuda_graphs: bool | None) -> None:
        self.model = model
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and self.device.index is None:
            # "cuda" means the current GPU; with its index, images already there are recognised as such.
            self.device = torch.device("cuda", torch.cuda.current_device())
        if use_triton is None:
            use_triton = on_cuda and triton is not None
        if use_triton and not (on_cuda and triton is not None):
            raise ValueError("use_triton needs a CUDA device and the triton package")
        self.use_triton = use_triton
        if cuda_graphs is None:
            cuda_graphs = bool(use_triton)
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple] = {}        # face count bucket -> (graph, faces in, points out)
        self._graph_grey: torch.Tensor | None = None
        dev = self.device
        self._padding_face = torch.tensor([0, 0, 1, 1, 0, 1, 1], dtype=torch.int64, device=dev)
        mean = model.initial_shape.astype(np.float64).reshape(-1, 2)
        centred = mean - mean.mean(axis=0)
        self._mean_shape = torch.from_numpy(model.initial_shape).to(dev)
        # Patterns whose products with the current shape's centred points sum to a and b of the similarity
        # transform (see _similarity_to), and the divisor: points times dlib's sigma_from.
        patterns = np.stack([centred, np.stack([-centred[:, 1], centred[:, 0]], 1)])     # (2, parts, 2)
        self._similarity_patterns = torch.from_numpy(patterns).to(dev)
        self._similarity_scale = float((centred ** 2).sum())
        self._split1 = torch.from_numpy(model.split_index1.astype(np.int32)).to(dev)
        self._split2 = torch.from_numpy(model.split_index2.astype(np.int32)).to(dev)
        self._threshold = torch.from_numpy(model.split_threshold).to(dev)
        self._leaves = torch.from_numpy(model.leaf_values).to(dev)
        # Coordinates of each feature pixel's anchor in the flat shape vector: x at 2k, y at 2k + 1.
        anchor_coords = np.stack([2 * model.anchor_index, 2 * model.anchor_index + 1], 1)  # (cascades, 2, P)
        self._anchor_coords = torch.from_numpy(anchor_coords).to(dev)
        self._unit_square_pinv = torch.from_numpy(_UNIT_SQUARE_PINV).to(dev)
        self._delta = torch.from_numpy(model.anchor_delta).to(dev)                  # (cascades, pixels, 2)
        self._tree_base = torch.arange(model.num_trees, device=dev, dtype=torch.int64) * model.num_splits
        self._leaf_base = torch.arange(model.num_trees, device=dev, dtype=torch.int64) * (model.num_splits + 1)
        self._depth = int(math.log2(model.num_splits + 1))
        self._unroll = max(u for u in (10, 8, 5, 4, 2, 1) if model.num_trees % u == 0)

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    # -- public API ----------------------------------------------------------------------------------------

    def predict(self, images: Sequence, boxes: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """Landmarks of every box of every image: a list with one (n_i, parts, 2) int64 array per image."""
        if len(images) != len(boxes):
            raise ValueError(f"predict: {len(images)} images but {len(boxes)} lists of boxes")
        flat, image_offsets, sizes = self._stack_images(images)
        counts = []
        face_rows = []
        for i, image_boxes in enumerate(boxes):
            arr = _boxes_array(image_boxes, i)
            counts.append(arr.shape[0])
            if arr.shape[0]:
                h, w = sizes[i]
                face_rows.append(np.column_stack([arr, np.full(arr.shape[0], image_offsets[i]),
                                                  np.full(arr.shape[0], w), np.full(arr.shape[0], h)]))
        faces = np.concatenate(face_rows) if face_rows else np.zeros((0, 7), dtype=np.int64)
        points = self.predict_faces(grey_levels(flat), torch.from_numpy(faces).to(self.device)).cpu().numpy()
        return list(np.split(points, np.cumsum(counts)[:-1])) if counts else []

    def predict_faces(self, grey: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Low-level entry: `grey` a flat uint8 buffer on the device holding the grey levels of all images
        ((r + g + b) // 3, see `grey_levels`); `faces` an (N, 7) int64 tensor on the device of (left, top,
        right, bottom, offset of the face's image in `grey`, image width, image height). Returns (N, parts,
        2) int64 points on the device."""
        if self.cuda_graphs and faces.shape[0] > 0:
            return self._predict_faces_graphed(grey, faces)
        return self._predict_faces_eager(grey, faces)

    def _predict_faces_graphed(self, grey: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        # A graph reads its inputs from fixed buffers: the grey levels are copied into one buffer that only
        # grows (graphs captured on a smaller one are dropped), the faces into the bucket's table, whose
        # rows past the batch hold a 1x1 face at pixel 0 (computed and discarded).
        n = faces.shape[0]
        bucket = max(_MIN_GRAPH_FACES, 1 << (n - 1).bit_length())
        if self._graph_grey is None or self._graph_grey.numel() < grey.numel():
            old = 0 if self._graph_grey is None else self._graph_grey.numel()
            self._graphs.clear()
            self._graph_grey = torch.zeros(max(grey.numel(), 2 * old, 1), dtype=torch.uint8, device=self.device)
        self._graph_grey[:grey.numel()].copy_(grey)
        if bucket not in self._graphs:
            table = self._padding_face.repeat(bucket, 1)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compiles the kernels and warms the allocator outside the capture
                self._predict_faces_eager(self._graph_grey, table)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                points = self._predict_faces_eager(self._graph_grey, table)
            self._graphs[bucket] = (graph, table, points)
        graph, table, points = self._graphs[bucket]
        table[:n].copy_(faces)
        table[n:] = self._padding_face
        graph.replay()
        return points[:n].clone()

    def _predict_faces_eager(self, grey: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        n = faces.shape[0]
        parts = self.num_parts
        if n == 0:
            return torch.zeros((0, parts, 2), dtype=torch.int64, device=self.device)
        box_to_image = _box_transforms(faces[:, :4], self._unit_square_pinv)  # (N, 2, 3) float64
        image = faces[:, 4:7].to(torch.float64)
        image_offset = image[:, 0:1]                                     # (N, 1)
        image_size = image[:, 1:3, None]                                 # (N, 2, 1): width, height
        row_stride = torch.stack([torch.ones_like(image[:, 1]), image[:, 1]], 1)[:, :, None]  # (N, 2, 1)
        shape = self._mean_shape.repeat(n, 1)                            # (N, 2*parts) float32, a copy
        for c in range(self.model.num_cascades):
            tform = self._similarity_to(shape)
            values = self._feature_pixels(grey, shape, tform, c, box_to_image, image_offset, image_size,
                                          row_stride)
            if self.use_triton:
                self._cascade_triton(shape, values, c)
            else:
                self._cascade_torch(shape, values, c)
        xy = shape.view(n, parts, 2).transpose(1, 2)                    # (N, 2, parts)
        return _to_image_pixels(xy, box_to_image).to(torch.int64).transpose(1, 2).contiguous()

    # -- steps -----------------------------------------------------------------------------------------

    def _stack_images(self, images: Sequence) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
        tensors, offsets, sizes = [], [], []
        total = 0
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                t = image
            elif isinstance(image, np.ndarray):
                with warnings.catch_warnings():
                    # Read-only arrays (e.g. from Pillow) are fine: they are only read.
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(np.ascontiguousarray(image))
            else:
                raise ValueError(f"predict: image {i} must be a numpy array or a torch tensor, got "
                                 f"{type(image).__name__}")
            if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3:
                raise ValueError(f"predict: image {i} must be an HxWx3 uint8 array, got "
                                 f"{tuple(t.shape)} {t.dtype}")
            offsets.append(total)
            sizes.append((int(t.shape[0]), int(t.shape[1])))
            total += int(t.shape[0]) * int(t.shape[1])
            tensors.append(t.reshape(-1))
        if not tensors:
            return torch.zeros(0, dtype=torch.uint8, device=self.device), offsets, sizes
        # Images already on the device stay there; others are copied over one by one.
        return torch.cat([t.to(self.device) for t in tensors]), offsets, sizes

    def _similarity_to(self, shape: torch.Tensor) -> torch.Tensor:
        """dlib's find_similarity_transform(mean shape -> current shape), its 2x2 part as float32, (N, 2, 2).

        Umeyama's solution for two dimensions in closed form: with cov = mean over points of
        (to - mean_to)(from - mean_from)^T, the best rotation scaled by trace(D S) is
        [[a, -b], [b, a]] with a = cov00 + cov11, b = cov10 - cov01, and the scale divides by the variance
        of the mean shape. (dlib gets the same matrix from an SVD of cov; in double both agree to the last
        bits, and the result is rounded to float32. Checked against dlib's SVD arithmetic on 20000 random
        shapes: all 80000 float32 values equal.)"""
        n, parts = shape.shape[0], self.num_parts
        to = shape.view(n, 1, parts, 2).to(torch.float64)
        centred = to - to.mean(dim=2, keepdim=True)
        # a * parts * variance and b * parts * variance: products, then sums (no fused multiply-add).
        sums = (centred * self._similarity_patterns).sum(dim=(2, 3))     # (N, 2)
        a, b = (sums / self._similarity_scale).to(torch.float32).unbind(1)
        return torch.stack([a, -b, b, a], 1).view(n, 2, 2)

    def _feature_pixels(self, grey, shape, tform, c, box_to_image, image_offset, image_size, row_stride):
        """The grey levels of cascade c's feature pixels for every face, (N, pixels) float32."""
        n, parts = shape.shape[0], self.num_parts
        delta = self._delta[c]                                           # (P, 2)
        # tform * delta in float32: each product rounded, then their sum, as dlib's 2x2 * vector product.
        products = tform[:, :, None, :] * delta[None, None, :, :]        # (N, 2, P, 2)
        moved = products[..., 0] + products[..., 1]                       # (N, 2, P)
        anchor = shape[:, self._anchor_coords[c]]                         # (N, 2, P)
        pix = _to_image_pixels(moved + anchor, box_to_image)              # (N, 2, P) integral, in double
        inside = ((pix >= 0) & (pix < image_size)).all(dim=1)             # (N, P)
        # x + y * width + offset: integers below 2**53, exact in double.
        index = (pix * row_stride).sum(dim=1) + image_offset
        index = torch.where(inside, index, 0).to(torch.int64)
        return torch.where(inside, grey[index], 0).to(torch.float32)

    def _leaf_index_torch(self, values: torch.Tensor, c: int) -> torch.Tensor:
        """Leaf reached in every tree of cascade c by every face, (N, trees) int64."""
        n, trees = values.shape[0], self.model.num_trees
        split1, split2 = self._split1[c].reshape(-1), self._split2[c].reshape(-1)
        threshold = self._threshold[c].reshape(-1)
        node = torch.zeros((n, trees), dtype=torch.int64, device=values.device)
        for _ in range(self._depth):
            split = self._tree_base + node
            f1 = values.gather(1, split1[split].to(torch.int64))
            f2 = values.gather(1, split2[split].to(torch.int64))
            go_left = (f1 - f2) > threshold[split]
            node = 2 * node + 2 - go_left.to(torch.int64)
        return node - self.model.num_splits

    def _cascade_torch(self, shape: torch.Tensor, values: torch.Tensor, c: int) -> None:
        leaf_rows = (self._leaf_base + self._leaf_index_torch(values, c)).t().contiguous()  # (trees, N)
        leaves = self._leaves[c].reshape(-1, shape.shape[1])
        # dlib's order: the shape plus tree 0's leaf, plus tree 1's leaf, ... each sum rounded to float32.
        for rows in leaf_rows:
            shape += leaves.index_select(0, rows)

    def _cascade_triton(self, shape: torch.Tensor, values: torch.Tensor, c: int) -> None:
        n = shape.shape[0]
        trees, splits = self.model.num_trees, self.model.num_splits
        coords = shape.shape[1]
        leaf = torch.empty((n, trees), dtype=torch.int32, device=shape.device)
        _tree_leaf_kernel[(n, triton.cdiv(trees, _TREE_BLOCK))](
            values, self._split1[c], self._split2[c], self._threshold[c], leaf,
            trees, values.shape[1], NUM_SPLITS=splits, DEPTH=self._depth, BLOCK=_TREE_BLOCK, num_warps=4)
        _add_leaves_kernel[(n, triton.cdiv(coords, _COORD_BLOCK))](
            shape, leaf, self._leaves[c], splits + 1, coords,
            NUM_TREES=trees, BLOCK=_COORD_BLOCK, UNROLL=self._unroll, num_warps=1)


def grey_levels(rgb: torch.Tensor) -> torch.Tensor:
    """dlib's get_pixel_intensity of RGB pixels, (r + g + b) // 3, of a flat uint8 RGB buffer."""
    return (rgb.view(-1, 3).sum(dim=1, dtype=torch.int16) // 3).to(torch.uint8)


def _boxes_array(image_boxes, image_index: int) -> np.ndarray:
    if len(image_boxes) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    arr = np.asarray(image_boxes)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"predict: boxes of image {image_index} must be (left, top, right, bottom) tuples, "
                         f"got an array of shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise ValueError(f"predict: boxes of image {image_index} must have integer coordinates (dlib "
                             f"rectangles), got {arr.dtype}")
    return arr.astype(np.int64)


def _box_transforms(boxes: torch.Tensor, pinv: torch.Tensor) -> torch.Tensor:
    """dlib's unnormalizing_tform of each (left, top, right, bottom) box: (N, 2, 3) float64 [m | b], each
    entry the dot product of a row of Q with a column of pinv(P) summed left to right, as dlib's matrix
    product does (separate multiplies and adds: no fused multiply-add)."""
    l, t, r, b = boxes.to(torch.float64).unbind(1)
    q = torch.stack([torch.stack([l, r, r], 1), torch.stack([t, t, b], 1)], 1)      # (N, 2, 3)
    terms = q[:, :, :, None] * pinv[None, None, :, :]                                # (N, 2, k, 3)
    return terms[:, :, 0] + terms[:, :, 1] + terms[:, :, 2]


def _to_image_pixels(points: torch.Tensor, box_to_image: torch.Tensor) -> torch.Tensor:
    """Points (N, 2, P) float32 in box-normalised coordinates -> integral pixel coordinates (N, 2, P) in
    float64: dlib's m * p + b in double, then rounding with floor(v + 0.5)."""
    p = points.to(torch.float64)
    m = box_to_image
    x = m[:, :, 0:1] * p[:, 0:1] + m[:, :, 1:2] * p[:, 1:2] + m[:, :, 2:3]
    return torch.floor(x + 0.5)


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


_TREE_BLOCK = 128
_COORD_BLOCK = 32
_MIN_GRAPH_FACES = 16

if triton is not None:

    @triton.jit
    def _tree_leaf_kernel(values_ptr, split1_ptr, split2_ptr, threshold_ptr, leaf_ptr, num_trees, num_pixels,
                          NUM_SPLITS: tl.constexpr, DEPTH: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (face, block of trees); each lane walks one tree down its DEPTH levels.
        face = tl.program_id(0).to(tl.int64)
        tree = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = tree < num_trees
        node = tl.zeros([BLOCK], dtype=tl.int32)
        row = values_ptr + face * num_pixels
        for _ in tl.static_range(DEPTH):
            split = tree * NUM_SPLITS + node
            i1 = tl.load(split1_ptr + split, mask=live, other=0)
            i2 = tl.load(split2_ptr + split, mask=live, other=0)
            threshold = tl.load(threshold_ptr + split, mask=live, other=0.0)
            f1 = tl.load(row + i1, mask=live, other=0.0)
            f2 = tl.load(row + i2, mask=live, other=0.0)
            node = 2 * node + tl.where((f1 - f2) > threshold, 1, 2)
        tl.store(leaf_ptr + face * num_trees + tree, node - NUM_SPLITS, mask=live)

    @triton.jit
    def _add_leaves_kernel(shape_ptr, leaf_ptr, leaves_ptr, num_leaves, num_coords, NUM_TREES: tl.constexpr,
                           BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        # One program per (face, block of coordinates): the trees' leaves are added one tree after the
        # other, in dlib's order. UNROLL divides NUM_TREES; unrolling lets the loads of several trees be
        # issued before their adds, which stay in order. NUM_TREES is a constant of the model (one variant
        # per model): a loop bound Triton's interpreter can run too (tests/test_triton_kernels_interpreted.py).
        face = tl.program_id(0).to(tl.int64)
        coord = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = coord < num_coords
        shape_row = shape_ptr + face * num_coords + coord
        acc = tl.load(shape_row, mask=live, other=0.0)
        leaf_row = leaf_ptr + face * NUM_TREES
        for first in range(0, NUM_TREES, UNROLL):
            for u in tl.static_range(UNROLL):
                tree = first + u
                leaf = tl.load(leaf_row + tree).to(tl.int64)
                acc = acc + tl.load(leaves_ptr + (tree * num_leaves + leaf) * num_coords + coord, mask=live,
                                    other=0.0)
        tl.store(shape_row, acc, mask=live)
