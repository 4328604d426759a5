"""A contact sheet of a finished output: aligned inputs above their reconstructions, for a quick look.

Reads the first image shard(s) of an output (WebDataset members `<key>.aligned.<ext>` and
`<key>.recon.<ext>`, so it needs `output.save_aligned`) and writes `contact_sheet.png` at the output root.
"""

from __future__ import annotations

import io
import posixpath
import tarfile

import numpy as np
from PIL import Image

from .storage import atomic_put

SHEET_NAME = "contact_sheet.png"


def _pairs(fs, root: str, limit: int) -> list[tuple[str, Image.Image, Image.Image]]:
    pairs: list[tuple[str, Image.Image, Image.Image]] = []
    for tar_path in sorted(fs.glob(posixpath.join(root, "images", "*.tar"))):
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            for name in sorted(members):
                key, kind, _ext = name.rsplit(".", 2) if name.count(".") >= 2 else (name, "", "")
                if kind != "aligned":
                    continue
                recon = next((n for n in members if n.startswith(f"{key}.recon.")), None)
                if recon is None:
                    continue
                load = lambda n: Image.open(io.BytesIO(tf.extractfile(members[n]).read())).convert("RGB")  # noqa: E731
                pairs.append((key, load(name), load(recon)))
                if len(pairs) >= limit:
                    return pairs
    return pairs


def write_contact_sheet(fs, root: str, limit: int = 16, tile: int = 128) -> str | None:
    """Columns of (input, reconstruction) pairs; returns the sheet's path, or None when there is nothing to show."""
    pairs = _pairs(fs, root, limit)
    if not pairs:
        return None
    sheet = np.full((2 * tile, len(pairs) * tile, 3), 255, np.uint8)
    for i, (_key, aligned, recon) in enumerate(pairs):
        sheet[:tile, i * tile:(i + 1) * tile] = np.asarray(aligned.resize((tile, tile), Image.Resampling.LANCZOS))
        sheet[tile:, i * tile:(i + 1) * tile] = np.asarray(recon.resize((tile, tile), Image.Resampling.LANCZOS))
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    path = posixpath.join(root, SHEET_NAME)
    atomic_put(fs, path, buf.getvalue())
    return path
