"""Reading third-party pretrained weight files (torchvision, lpips, ArcFace, face parsing): the state dict
unwrapped from whatever the file holds, and a strict load whose error names every key that does not fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError


def plain_state_dict(obj: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a file that may wrap it ({'state_dict': ...} / {'model': ...} / {'net': ...})
    and may carry DataParallel's ``module.`` prefixes."""
    for key in ("state_dict", "model", "net"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors in this file")
    return sd


def load_strict(net: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """Load ``sd`` into ``net`` as float32; any missing, unexpected (other than torchvision's ``classifier.*``)
    or mis-shaped key is a ``CheckpointError`` naming the file and the network."""
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own) - {k for k in sd if k.startswith("classifier.")})
    shaped = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shaped)) if items]
    if problems:
        raise CheckpointError(f"{path}: does not match the {what}: " + "; ".join(problems))
    net.load_state_dict({k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) for k in own}, strict=True)
