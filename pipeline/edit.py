"""Stage 7, edit: latent editing with direction files, between inversion and writing.

Configured by ``edit.*`` (see docs/editing_and_tasks.md)::

    edit:
      directions: {age: path/to/age.npy, smile: s3://bucket/smile.npy}
      alphas: [-3, 3]
      layers: null        # [start, end): the W+ layers an edit touches; null = all
      save_codes: false   # edited codes as extra Parquet columns codes_edit_<name>_<alpha>

An edit is ``codes + alpha * direction`` on the chosen layers. Each (direction, alpha) pair is a
*variant* tagged ``edit_<name>_<alpha>``: its images go into the shard's tar as ``<key>.<tag>.<ext>``.

Direction files are untrusted input: they are read with ``np.load(allow_pickle=False)`` (a pickled
object array is refused, never unpickled), must be floating point, finite, and of shape (D,), (1, D) or
(n_latent, D) for the model's (n_latent, D = style_dim). They are loaded and checked on the driver before
any shard starts (``load_directions``); the actors receive the checked arrays, not the paths.
"""
from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import numpy as np
import torch

from .config import DIRECTION_NAME, EditConfig
from .images import MODEL_INPUT_SIZE, to_uint8
from .records import EditResult, EditVariant
from .storage import get_fs

__all__ = ["DirectionError", "load_direction", "load_directions", "directions_sha256", "variant_tag",
           "edit_variants", "apply_direction", "make_edit_options", "apply_edit", "decode_codes"]

_NPY_MAGIC = b"\x93NUMPY"
MAX_DIRECTION_BYTES = 64 << 20   # an (18, 512) float64 file is 74 kB; anything this large is not a direction


class DirectionError(ValueError):
    """A direction file that cannot be used; the message names the file and the problem."""


def _read_bytes(url: str, endpoint_url: str | None) -> bytes:
    fs, path = get_fs(url, endpoint_url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise DirectionError(f"{url}: direction file not found") from None
    if size is not None and size > MAX_DIRECTION_BYTES:
        raise DirectionError(f"{url}: {size} bytes is too large for a direction file")
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise DirectionError(f"{url}: direction file not found") from None


def parse_direction(data: bytes, where: str, n_latent: int, style_dim: int) -> np.ndarray:
    """``.npy`` bytes -> (n_latent, style_dim) float32; raises DirectionError naming ``where``."""
    if not data.startswith(_NPY_MAGIC):
        raise DirectionError(f"{where}: not a .npy file (no NumPy magic header)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        msg = str(e)
        if "allow_pickle" in msg or "Object arrays" in msg:
            raise DirectionError(f"{where}: holds a pickled object array; refused (only float arrays are "
                                 f"accepted, and direction files are never unpickled)") from None
        raise DirectionError(f"{where}: not a readable .npy file: {msg}") from None
    except Exception as e:  # noqa: BLE001 - truncated headers raise EOFError, OSError, ...
        raise DirectionError(f"{where}: not a readable .npy file: {type(e).__name__}: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise DirectionError(f"{where}: expected one array, got {type(arr).__name__}")
    if arr.dtype.kind != "f":
        raise DirectionError(f"{where}: dtype {arr.dtype} is not floating point")
    allowed = [(style_dim,), (1, style_dim), (n_latent, style_dim)]
    if arr.shape not in allowed:
        raise DirectionError(f"{where}: shape {arr.shape} does not fit the model; expected one of "
                             f"{', '.join(map(str, allowed))} (n_latent={n_latent}, style_dim={style_dim})")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DirectionError(f"{where}: {bad} non-finite value(s) (NaN or inf)")
    out = np.broadcast_to(arr.reshape(-1, style_dim), (n_latent, style_dim)).astype(np.float32)
    if not np.isfinite(out).all():
        raise DirectionError(f"{where}: values overflow float32")
    return out


def load_direction(url: str, n_latent: int, style_dim: int, endpoint_url: str | None = None) -> np.ndarray:
    """Read and check one direction file (local path or fsspec URL) -> (n_latent, style_dim) float32."""
    return parse_direction(_read_bytes(url, endpoint_url), url, n_latent, style_dim)


def load_directions(directions: dict[str, str], n_latent: int, style_dim: int,
                    endpoint_url: str | None = None) -> dict[str, np.ndarray]:
    for name in directions:
        if not isinstance(name, str) or not DIRECTION_NAME.match(name):
            raise DirectionError(f"edit.directions: bad name {name!r} (letters, digits, _ and - only)")
    return {name: load_direction(url, n_latent, style_dim, endpoint_url) for name, url in directions.items()}


def directions_sha256(directions: dict[str, np.ndarray]) -> dict[str, str]:
    """name -> sha256 of the loaded direction's float32 values: reruns notice a file replaced at its path."""
    return {n: hashlib.sha256(np.ascontiguousarray(d).tobytes()).hexdigest() for n, d in directions.items()}


def variant_tag(name: str, alpha: float) -> str:
    a = float(alpha)
    return f"edit_{name}_{int(a) if a.is_integer() else format(a, 'g')}"


def edit_variants(directions: dict[str, np.ndarray], alphas: list[float]) -> list[tuple[str, str, float]]:
    """(tag, direction name, alpha) for every direction and alpha, in config order."""
    return [(variant_tag(n, a), n, float(a)) for n in directions for a in alphas]


def apply_direction(codes: np.ndarray, direction: np.ndarray, alpha: float,
                    layers: tuple[int, int] | list[int] | None = None) -> np.ndarray:
    """codes (N, n_latent, D) + alpha * direction (n_latent, D), on layers [start, end) only if given."""
    d = np.asarray(direction, np.float32)
    if layers is not None:
        start, end = int(layers[0]), int(layers[1])
        mask = np.zeros((d.shape[0], 1), np.float32)
        mask[start:end] = 1.0
        d = d * mask
    return (np.asarray(codes, np.float32) + np.float32(alpha) * d[None]).astype(np.float32)


def make_edit_options(edit: EditConfig, n_latent: int, style_dim: int, want_images: bool,
                      endpoint_url: str | None = None) -> dict | None:
    """Load and check everything ``edit.*`` names; None when no edit is configured. Raises DirectionError."""
    if not edit.directions:
        return None
    layers = list(edit.layers) if edit.layers is not None else None
    if layers is not None and not (0 <= layers[0] < layers[1] <= n_latent):
        raise DirectionError(f"edit.layers: [{layers[0]}, {layers[1]}) is not within this model's "
                             f"{n_latent} W+ layers")
    dirs = load_directions(edit.directions, n_latent, style_dim, endpoint_url)
    return {"directions": dirs, "alphas": [float(a) for a in edit.alphas], "layers": layers,
            "save_codes": bool(edit.save_codes), "images": want_images}


def decode_codes(model: Any, codes: np.ndarray, batch_size: int = 16, device: str | None = None) -> np.ndarray:
    """(N, n_latent, D) float32 -> (N, 256, 256, 3) uint8 through ``model.decode`` in mini-batches."""
    if len(codes) == 0:
        return np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), np.uint8)
    device = device or str(model.latent_avg.device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(codes), batch_size):
            c = torch.from_numpy(np.ascontiguousarray(codes[i:i + batch_size], np.float32)).to(device)
            out.append(to_uint8(model.decode(c)))
    return np.concatenate(out)


def apply_edit(model: Any, codes: np.ndarray, keys: list[str], options: dict | None = None,
               batch_size: int = 16) -> EditResult | None:
    """Run inside the inversion actor after ``invert_faces``. ``codes``: (N, n_latent, D) float32 in the
    order of ``keys``. ``options`` come from ``make_edit_options`` (None: no edit, nothing is paid)."""
    if not options or not options.get("directions") or len(codes) == 0:
        return None
    t0 = time.perf_counter()
    res = EditResult(save_codes=bool(options.get("save_codes")))
    for tag, name, alpha in edit_variants(options["directions"], options["alphas"]):
        edited = apply_direction(codes, options["directions"][name], alpha, options.get("layers"))
        images = decode_codes(model, edited, batch_size) if options.get("images", True) else None
        res.variants.append(EditVariant(tag, edited, images))
    res.seconds = time.perf_counter() - t0
    return res
