"""dlib's shape_predictor (the 68-point face landmark model) in PyTorch, batched over faces, equal to dlib.

    from models.alignment.landmarks import ShapePredictor
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
trees vectorised, the leaves as one vectorised add per tree. Both give identical bits: the kernels serve only
where they passed their check on the device (models/kernel_check.py), and
tests/models/alignment/test_triton_kernels_interpreted.py runs them under Triton's interpreter on CPU.

Order in this module: dlib's box transform and the torch reference steps, the kernels, their launcher, the
probe, the public ``apply_cascade`` and ``ShapePredictor``. Model files: models/alignment/landmarks_model.py.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..kernel_check import tl, triton, use_kernels
from .device import upload
from .flat_views import shared_flat
from .landmarks_model import ShapePredictorModel, random_model, read_shape_predictor

__all__ = ["ShapePredictor", "DeviceForest", "apply_cascade", "check_landmark_kernels", "grey_levels"]

_TREE_BLOCK = 128   # trees per program of _tree_leaf_kernel
_COORD_BLOCK = 32   # shape coordinates per program of _add_leaves_kernel
_MIN_GRAPH_FACES = 16  # the smallest face count bucket of a captured CUDA graph

# dlib maps the normalised shape into a box with the affine transform from the unit square's corners
# (0,0), (1,0), (1,1) to the box's top-left, top-right and bottom-right: m = Q * pinv(P), where P holds the
# square's corners as homogeneous columns [[0,1,1],[0,0,1],[1,1,1]] and Q the box's corners
# [[l,r,r],[t,t,b]]. P's exact inverse has integer entries, but dlib takes pinv(P) from its SVD
# (Golub-Reinsch, svd4 in dlib/matrix/matrix_la.h), whose result is off by a few units in the last place;
# those errors decide which way a point lying exactly halfway between two pixels rounds, which happens
# often enough on real faces to matter. These are the nine doubles dlib computes (obtained by running the
# same algorithm with the same operation order in double); tests/models/alignment/test_landmarks.py checks them against
# dlib on thousands of boxes with shapes placed on half pixels, where the exact inverse disagrees with dlib
# almost every time.
_UNIT_SQUARE_PINV = np.array([
    [float.fromhex("-0x1.0000000000001p+0"), float.fromhex("-0x1.0000000000000p-52"),
     float.fromhex("0x1.0000000000001p+0")],
    [float.fromhex("0x1.ffffffffffffdp-1"), float.fromhex("-0x1.ffffffffffffbp-1"),
     float.fromhex("0x1.8000000000000p-53")],
    [0.0, float.fromhex("0x1.0000000000001p+0"), float.fromhex("0x1.8000000000000p-54")],
], dtype=np.float64)


# -- torch reference -------------------------------------------------------------------------------------------

def grey_levels(rgb: torch.Tensor) -> torch.Tensor:
    """dlib's get_pixel_intensity of RGB pixels, (r + g + b) // 3, of a flat uint8 RGB buffer."""
    return (rgb.view(-1, 3).sum(dim=1, dtype=torch.int16) // 3).to(torch.uint8)


def _image_tensor(i: int, image) -> torch.Tensor:
    """Image ``i`` of a predict call as a tensor (numpy arrays wrapped, not copied), checked to be HxWx3 uint8."""
    if isinstance(image, torch.Tensor):
        t = image
    elif isinstance(image, np.ndarray):
        with warnings.catch_warnings():
            # Read-only arrays (e.g. from Pillow) are fine: they are only read.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(image))
    else:
        raise ValueError(f"predict: image {i} must be a numpy array or a torch tensor, got {type(image).__name__}")
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(f"predict: image {i} must be an HxWx3 uint8 array, got {tuple(t.shape)} {t.dtype}")
    return t


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


def _face_table(boxes) -> tuple[list[int], np.ndarray]:
    """Faces per image and the (N, 7) int64 table of predict_faces with the boxes filled in (columns 4-6, the
    image's place, left 0). All boxes are read as one array; only when that fails are they read image by image,
    for an error naming the image."""
    counts = [len(b) for b in boxes]
    flat = [box for image_boxes in boxes for box in image_boxes]
    table = np.zeros((len(flat), 7), dtype=np.int64)
    if not flat:
        return counts, table
    try:
        arr = np.asarray(flat)
        valid = arr.ndim == 2 and arr.shape[1] == 4 and (np.issubdtype(arr.dtype, np.integer) or (
            np.issubdtype(arr.dtype, np.floating) and bool(np.all(arr == np.round(arr)))))
    except ValueError:  # ragged boxes
        valid = False
    if not valid:
        arr = np.concatenate([_boxes_array(b, i) for i, b in enumerate(boxes)])
    table[:, :4] = arr
    return counts, table


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


@dataclass(frozen=True)
class DeviceForest:
    """A model's trees on one device, as the cascade steps read them: split indices (int32), thresholds and
    leaves (float32) per (cascade, tree), each tree's first split and first leaf row, its depth, and the
    leaf kernel's unrolling (a divisor of the tree count)."""

    split1: torch.Tensor      # (cascades, trees, splits) int32
    split2: torch.Tensor      # (cascades, trees, splits) int32
    threshold: torch.Tensor   # (cascades, trees, splits) float32
    leaves: torch.Tensor      # (cascades, trees, splits + 1, coordinates) float32
    tree_base: torch.Tensor   # (trees,) int64: tree t's first split
    leaf_base: torch.Tensor   # (trees,) int64: tree t's first leaf
    num_trees: int
    num_splits: int
    depth: int
    unroll: int

    @classmethod
    def from_model(cls, model: ShapePredictorModel, device) -> "DeviceForest":
        trees, splits = model.num_trees, model.num_splits
        return cls(torch.from_numpy(model.split_index1.astype(np.int32)).to(device),
                   torch.from_numpy(model.split_index2.astype(np.int32)).to(device),
                   torch.from_numpy(model.split_threshold).to(device), torch.from_numpy(model.leaf_values).to(device),
                   torch.arange(trees, device=device, dtype=torch.int64) * splits,
                   torch.arange(trees, device=device, dtype=torch.int64) * (splits + 1),
                   trees, splits, int(math.log2(splits + 1)), max(u for u in (10, 8, 5, 4, 2, 1) if trees % u == 0))


def _leaf_index_torch(values: torch.Tensor, forest: DeviceForest, c: int) -> torch.Tensor:
    """Leaf reached in every tree of cascade c by every face, (N, trees) int64."""
    n, trees = values.shape[0], forest.num_trees
    split1, split2 = forest.split1[c].reshape(-1), forest.split2[c].reshape(-1)
    threshold = forest.threshold[c].reshape(-1)
    node = torch.zeros((n, trees), dtype=torch.int64, device=values.device)
    for _ in range(forest.depth):
        split = forest.tree_base + node
        f1 = values.gather(1, split1[split].to(torch.int64))
        f2 = values.gather(1, split2[split].to(torch.int64))
        go_left = (f1 - f2) > threshold[split]
        node = 2 * node + 2 - go_left.to(torch.int64)
    return node - forest.num_splits


def _cascade_torch(shape: torch.Tensor, values: torch.Tensor, forest: DeviceForest, c: int) -> None:
    leaf_rows = (forest.leaf_base + _leaf_index_torch(values, forest, c)).t().contiguous()  # (trees, N)
    leaves = forest.leaves[c].reshape(-1, shape.shape[1])
    # dlib's order: the shape plus tree 0's leaf, plus tree 1's leaf, ... each sum rounded to float32.
    for rows in leaf_rows:
        shape += leaves.index_select(0, rows)


# -- Triton kernels ------------------------------------------------------------------------------------------

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
        # per model): a loop bound Triton's interpreter can run too
        # (tests/models/alignment/test_triton_kernels_interpreted.py).
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


# -- launcher, probe, public functions --------------------------------------------------------------------------

def _cascade_triton(shape: torch.Tensor, values: torch.Tensor, forest: DeviceForest, c: int) -> None:
    """_cascade_torch with the two kernels: same arguments, same shape bit for bit."""
    n = shape.shape[0]
    trees, splits = forest.num_trees, forest.num_splits
    coords = shape.shape[1]
    leaf = torch.empty((n, trees), dtype=torch.int32, device=shape.device)
    _tree_leaf_kernel[(n, triton.cdiv(trees, _TREE_BLOCK))](
        values, forest.split1[c], forest.split2[c], forest.threshold[c], leaf,
        trees, values.shape[1], NUM_SPLITS=splits, DEPTH=forest.depth, BLOCK=_TREE_BLOCK, num_warps=4)
    _add_leaves_kernel[(n, triton.cdiv(coords, _COORD_BLOCK))](
        shape, leaf, forest.leaves[c], splits + 1, coords,
        NUM_TREES=trees, BLOCK=_COORD_BLOCK, UNROLL=forest.unroll, num_warps=1)


def check_landmark_kernels(device, trees: int = 500, depth: int = 4, parts: int = 68, pixels: int = 500,
                           cascades: int = 1, faces: int = 5, seed: int = 0) -> str | None:
    """The cascade kernels against the torch path on ``device``, for a random model of the given shape (the
    kernels are specialised on trees, depth and parts) with every other threshold an integer: the feature
    pixels are quantised grey levels, so those splits see f1 - f2 == threshold (a tie goes to the right
    child). Each cascade from the same shapes and values. None when equal, else what differs."""
    model = random_model(cascades=cascades, trees=trees, depth=depth, pixels=pixels, parts=parts, seed=seed)
    threshold = model.split_threshold.copy()
    threshold[..., ::2] = np.round(threshold[..., ::2] / 8)
    model = dataclasses.replace(model, split_threshold=threshold)
    forest = DeviceForest.from_model(model, device)
    rng = np.random.default_rng(seed)
    values = torch.from_numpy((rng.integers(0, 6, (faces, pixels)) * 4).astype(np.float32))
    split1, split2 = model.split_index1[:, :, 0], model.split_index2[:, :, 0]
    if not bool(((values[:, split1] - values[:, split2]) == torch.from_numpy(threshold[:, :, 0])).any()):
        return "no tie at any root split: the tie rule is not exercised"
    start = torch.from_numpy(model.initial_shape).repeat(faces, 1) + torch.from_numpy(
        rng.normal(0, 0.02, (faces, 2 * parts)).astype(np.float32))
    values, start = values.to(device), start.to(device)
    for c in range(cascades):
        want, got = start.clone(), start.clone()
        apply_cascade(want, values, forest, c, use_triton=False)
        apply_cascade(got, values, forest, c, use_triton=True)
        if not torch.equal(want, got):
            return f"cascade {c}: {int((want != got).sum())} of {want.numel()} shape values differ"
        if torch.equal(want, start):
            return f"cascade {c}: the leaves moved nothing: nothing was compared"
    return None


def apply_cascade(shape: torch.Tensor, values: torch.Tensor, forest: DeviceForest, c: int,
                  use_triton: bool | None = None) -> None:
    """Cascade ``c`` of ``forest`` on the current shapes (N, 2 * parts) float32, in place: every tree walked on
    the faces' feature pixel values (N, pixels) float32, the trees' leaves added one tree after the other, in
    dlib's order. ``use_triton``: see models/kernel_check.py (None: the kernels on CUDA once checked
    there for this tree shape)."""
    if use_kernels("landmarks", shape.device, use_triton,
                   lambda dev: check_landmark_kernels(dev, forest.num_trees, forest.depth, shape.shape[1] // 2,
                                                      values.shape[1]),
                   variant=(forest.num_trees, forest.num_splits, shape.shape[1] // 2)):
        _cascade_triton(shape, values, forest, c)
    else:
        _cascade_torch(shape, values, forest, c)


class ShapePredictor:
    """dlib's shape_predictor on a torch device; `predict` is batched over all faces of all images."""

    def __init__(self, path: str, device="cpu", use_triton: bool | None = None, cuda_graphs: bool | None = None):
        """`use_triton`: the Triton kernels (None: on CUDA where they passed their check there, see
        models/kernel_check.py; True: forced, on CUDA or under Triton's interpreter). `cuda_graphs`: on
        CUDA, replay each batch size's (rounded up to a power of two) launches as one captured CUDA graph,
        which removes the per-launch CPU cost that bounds small batches. Default: on CUDA with the Triton
        kernels (BENCHMARKS.md has the measurement)."""
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
        splits = model.num_splits
        self.use_triton = use_kernels(
            "landmarks", self.device, use_triton,
            lambda dev: check_landmark_kernels(dev, trees=model.num_trees, depth=int(math.log2(splits + 1)),
                                               parts=model.num_parts, pixels=model.num_pixels),
            variant=(model.num_trees, splits, model.num_parts))
        if cuda_graphs is None:
            cuda_graphs = self.use_triton and on_cuda
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
        self._forest = DeviceForest.from_model(model, dev)
        # Coordinates of each feature pixel's anchor in the flat shape vector: x at 2k, y at 2k + 1.
        anchor_coords = np.stack([2 * model.anchor_index, 2 * model.anchor_index + 1], 1)  # (cascades, 2, P)
        self._anchor_coords = torch.from_numpy(anchor_coords).to(dev)
        self._unit_square_pinv = torch.from_numpy(_UNIT_SQUARE_PINV).to(dev)
        self._delta = torch.from_numpy(model.anchor_delta).to(dev)                  # (cascades, pixels, 2)

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    # -- public API ----------------------------------------------------------------------------------------

    def predict(self, images: Sequence, boxes: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """Landmarks of every box of every image: a list with one (n_i, parts, 2) int64 array per image, read
        back to the host in one transfer. Images that are views of one buffer on the device (a chunk's upload,
        see models/alignment/flat_views.py) are read where they lie; others are copied into one buffer first."""
        if len(images) != len(boxes):
            raise ValueError(f"predict: {len(images)} images but {len(boxes)} lists of boxes")
        tensors = [_image_tensor(i, image) for i, image in enumerate(images)]
        counts, faces = _face_table(boxes)
        if not faces.shape[0]:
            return [np.zeros((0, self.num_parts, 2), dtype=np.int64) for _ in images]
        shared = shared_flat(tensors)
        if shared is not None and shared[0].device == self.device:
            rgb, image_offsets, sizes = shared
        else:
            rgb, image_offsets, sizes = self._stack_images(tensors)
        faces[:, 4] = np.repeat(np.asarray(image_offsets, dtype=np.int64), counts)
        faces[:, 5:7] = np.repeat(np.asarray(sizes, dtype=np.int64).reshape(-1, 2), counts, axis=0)
        points = self.predict_rgb_faces(rgb, upload(faces, self.device)).cpu().numpy()
        return list(np.split(points, np.cumsum(counts)[:-1]))

    def predict_rgb_faces(self, rgb: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """predict_faces on the images' RGB pixels: ``rgb`` a flat (P, 3) uint8 buffer on the device, ``faces``
        rows as predict_faces' with offsets in pixels of ``rgb``. Only the feature pixels' grey levels are
        formed; the points stay on the device (nothing is read back)."""
        if self.cuda_graphs and faces.shape[0] > 0:
            return self._predict_faces_graphed(grey_levels(rgb), faces)
        return self._predict_faces_eager(rgb, faces)

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

    def _predict_faces_eager(self, pixels: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """``pixels``: grey levels (a flat uint8 buffer) or RGB pixels (a flat (P, 3) uint8 buffer)."""
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
            values = self._feature_pixels(pixels, shape, tform, c, box_to_image, image_offset, image_size,
                                          row_stride)
            apply_cascade(shape, values, self._forest, c, use_triton=self.use_triton)
        xy = shape.view(n, parts, 2).transpose(1, 2)                    # (N, 2, parts)
        return _to_image_pixels(xy, box_to_image).to(torch.int64).transpose(1, 2).contiguous()

    # -- steps -----------------------------------------------------------------------------------------

    def _stack_images(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
        """The images (checked by _image_tensor) in one flat (P, 3) uint8 buffer on the device: (buffer, first
        pixel row of each image, (w, h) of each)."""
        offsets, sizes = [], []
        total = 0
        for t in tensors:
            offsets.append(total)
            sizes.append((int(t.shape[1]), int(t.shape[0])))
            total += int(t.shape[0]) * int(t.shape[1])
        if not tensors:
            return torch.zeros((0, 3), dtype=torch.uint8, device=self.device), offsets, sizes
        return torch.cat([t.reshape(-1, 3).to(self.device) for t in tensors]), offsets, sizes

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

    def _feature_pixels(self, pixels, shape, tform, c, box_to_image, image_offset, image_size, row_stride):
        """The grey levels of cascade c's feature pixels for every face, (N, pixels) float32, from grey levels or
        from RGB pixels (``pixels`` (P, 3): the grey level of each feature pixel formed from its RGB, as
        grey_levels forms every pixel's)."""
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
        grey = pixels[index] if pixels.ndim == 1 else grey_levels(pixels[index])
        return torch.where(inside, grey.view(index.shape), 0).to(torch.float32)
