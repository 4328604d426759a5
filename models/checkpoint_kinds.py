"""What a checkpoint file is, said before anything reads it as one, and what a read checkpoint holds.

``sniff_checkpoint`` looks at the file's first bytes (and a zip's member names): a folder, an empty or
truncated file, a photo, a NumPy array, a text or YAML file, a zip that is not torch's, or a plain pickle are
each named as what they are, so torch.load only ever sees a PyTorch or safetensors file. ``describe_checkpoint``
names what a read dict holds (an E2Style model, a StyleGAN2 generator, another model's state dict), for the
loaders' errors when a file of one kind is given where another is expected. Nothing here unpickles: a
pickle's opcodes are only listed (``pickletools.genops``), never executed.
"""
from __future__ import annotations

import os
import pickletools
import struct
import zipfile
from typing import Any

__all__ = ["CheckpointError", "TORCH_ZIP", "TORCH_LEGACY", "SAFETENSORS", "sniff_checkpoint", "describe_checkpoint",
           "E2STYLE_MODULES"]

TORCH_ZIP, TORCH_LEGACY, SAFETENSORS = "torch zip", "torch legacy", "safetensors"
# The modules of an E2Style model's state_dict (the official layout).
E2STYLE_MODULES = ("encoder_firststage", "encoder_refinestage_list", "decoder")
SNIFF_BYTES = 4096
# torch.save's format before zip files: a pickle of this number first (LONG1 of 10 bytes; protocol 4 and up put
# a FRAME opcode before it).
_TORCH_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_TORCH_LEGACY_WITHIN = 16
_MAGIC = (  # (leading bytes, what the file is)
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy array (.npy)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"BZh", "a bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "an xz-compressed file"),
    (b"%PDF", "a PDF document"),
)
_WHAT_TO_GIVE = ("model.checkpoint takes an E2Style checkpoint: a .pt file written by torch.save "
                 "({'state_dict', 'latent_avg', 'opts'}) or its .safetensors form")
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _fail(path: str, what: str, hint: str = _WHAT_TO_GIVE) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {hint}")


def sniff_checkpoint(path: str | os.PathLike) -> str:
    """TORCH_ZIP, TORCH_LEGACY or SAFETENSORS for a file that is one; CheckpointError naming what it is otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith((".pt", ".pth", ".ckpt", ".safetensors")))
        hint = f"name one of the checkpoint files in it: {', '.join(inside[:5])}" if inside else _WHAT_TO_GIVE
        raise _fail(path, "is a folder, not a checkpoint file", hint)
    if not os.path.exists(path):
        raise _fail(path, "no such checkpoint file", "check the path (relative paths are from the working folder)")
    size = os.path.getsize(path)
    if size == 0:
        raise _fail(path, "is empty (0 bytes): an interrupted download or copy?", "fetch the file again")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, size)
    # Before the pickle test: a safetensors header's length (8 bytes, little-endian) may begin with 0x80 too.
    if _is_safetensors(head, size, path):
        return SAFETENSORS
    if head.startswith(b"\x80"):
        return _sniff_pickle(path, head)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise _fail(path, f"is {what}, not a checkpoint")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise _fail(path, "is a WebP image, not a checkpoint")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise _fail(path, "is a tar archive, not a checkpoint")
    text = _as_text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        kind = "JSON text" if text.lstrip().startswith(("{", "[")) else "a text file (YAML, a config or notes?)"
        raise _fail(path, f"is {kind}, not a checkpoint (it begins {first!r})")
    raise _fail(path, f"is not a PyTorch or safetensors checkpoint (unknown binary: {size} bytes beginning "
                      f"{head[:8].hex(' ')})")


def _sniff_zip(path: str, size: int) -> str:
    if not zipfile.is_zipfile(path):
        raise _fail(path, f"is a truncated or damaged zip ({size} bytes, no central directory): an incomplete "
                          "download or copy of a PyTorch checkpoint?", "fetch the file again")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH_ZIP
    if names and all(n.endswith(".npy") for n in names):
        raise _fail(path, "is a NumPy archive (.npz), not a checkpoint")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise _fail(path, f"is a zip archive that is not a PyTorch checkpoint (no data.pkl; members: {shown or 'none'})")


def _sniff_pickle(path: str, head: bytes) -> str:
    if _TORCH_LEGACY_MAGIC in head[:_TORCH_LEGACY_WITHIN]:
        return TORCH_LEGACY
    with open(path, "rb") as f:
        try:
            ops = {op.name for op, _, _ in pickletools.genops(f)}
        except Exception:  # noqa: BLE001 - a pickle that does not parse is damaged, whatever the error
            raise _fail(path, "is a damaged Python pickle, not a PyTorch checkpoint") from None
    if ops & _CODE_OPCODES:
        raise refused_pickle(path, "a plain Python pickle (not torch.save's format) that names classes or "
                                   "functions")
    raise _fail(path, "is a plain Python pickle of data (not torch.save's format), not a checkpoint")


def refused_pickle(path: str, what: str) -> CheckpointError:
    """The refusal of a file whose unpickling could run code; nothing in it ran."""
    return CheckpointError(f"{path}: refused to load: {what}; unpickling it could run code, so it is not read "
                           f"(nothing in it ran). Only tensors and plain containers are accepted: save the "
                           f"weights with torch.save of plain dicts of tensors, or as safetensors")


def _is_safetensors(head: bytes, size: int, path: str) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > size - 8:
        raise _fail(path, f"is a truncated safetensors file (header of {header_len} bytes, file of {size})",
                    "fetch the file again")
    return True


def _as_text(head: bytes) -> str | None:
    for cut in range(4):  # the sniffed prefix may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
    return text if printable >= 0.95 * max(len(text), 1) else None


def describe_checkpoint(ckpt: dict[str, Any]) -> str:
    """What a read checkpoint dict holds, in words: 'an E2Style checkpoint', 'a StyleGAN2 generator checkpoint
    ...', 'another model's checkpoint ...', 'a bare state dict ...'."""
    if "g_ema" in ckpt:
        return "a StyleGAN2 generator checkpoint ('g_ema')"
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict):
        modules = sorted({str(k).split(".")[0] for k in sd})
        if {"encoder_firststage", "decoder"} <= set(modules) and set(modules) <= set(E2STYLE_MODULES):
            return "an E2Style checkpoint"
        return f"another model's checkpoint (its state_dict holds the modules {', '.join(modules[:8]) or 'none'})"
    if ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
        keys = sorted(map(str, ckpt))
        return f"a bare state dict of {len(keys)} tensors ({', '.join(keys[:3])}, ...)"
    return f"a dict with the keys {sorted(map(str, ckpt))[:10]}"
