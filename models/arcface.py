"""ArcFace IR-SE50 (TreB1eN/pSp key layout: ``input_layer``, ``body``, ``output_layer``), the network behind
E2Style's identity loss and the initialisation of its encoders.

Architecture sizes (depth, widths, embedding size) are inferred from the weights, so narrow random nets
(tests) load the same way as the official ``model_ir_se50.pth``.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError, irse_spec, read_checkpoint
from .encoders import BottleneckIRSE, input_layer, ir_se_blocks
from .pretrained import load_strict, plain_state_dict


class Backbone(nn.Module):
    """ArcFace IR-SE (TreB1eN's ``Backbone(112, 50, 'ir_se')``) with the 5 feature taps of E2Style's
    multi-layer identity loss. ``widths`` other than (64, 128, 256, 512) give narrow test nets."""

    def __init__(self, num_layers: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512), embed_dim: int = 512,
                 drop_ratio: float = 0.6, affine: bool = True):
        super().__init__()
        specs = ir_se_blocks(num_layers, widths)
        self.input_layer = input_layer(3, widths[0])
        self.body = nn.Sequential(*[BottleneckIRSE(s.in_channel, s.depth, s.stride) for s in specs])
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(widths[3] * 7 * 7, embed_dim), nn.BatchNorm1d(embed_dim, affine=affine))
        starts = [i for i, s in enumerate(specs) if s.stride == 2][1:]
        self.stage_ends = tuple(starts) + (len(specs),)  # (3, 7, 21, 24) for IR-50

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.input_layer(x)
        feats = []
        begin = 0
        for end in self.stage_ends:
            for unit in self.body[begin:end]:
                x = unit(x)
            feats.append(x.flatten(1))
            begin = end
        feats.append(self.output_layer(x))
        return tuple(feats)


def load_ir_se50(path: str) -> Backbone:
    sd = plain_state_dict(read_checkpoint(path), path)
    spec = irse_spec(sd, path)
    if "output_layer.3.weight" not in sd:
        raise CheckpointError(f"{path}: an ArcFace IR-SE backbone needs output_layer.* (the embedding head); none in this file")
    net = Backbone(spec["num_layers"], spec["widths"], int(sd["output_layer.3.weight"].shape[0]),
                   affine="output_layer.4.weight" in sd)
    load_strict(net, sd, path, "ArcFace IR-SE backbone")
    return net.eval().requires_grad_(False)


def irse_encoder_init(encoder: nn.Module, sd: dict[str, torch.Tensor], path: str, include_input_layer: bool = True) -> int:
    """Copy IR-SE50 weights (``input_layer``, ``body``) into an E2Style encoder, as the official code does for
    every new stage (refinement stages skip ``input_layer``: they take 6 channels). Returns tensors copied."""
    own = encoder.state_dict()
    take = {k: v for k, v in sd.items() if k.startswith("body.") or (include_input_layer and k.startswith("input_layer."))}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in take.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: IR-SE weights do not fit the encoder (widths differ?): {', '.join(bad[:4])}")
    take = {k: v for k, v in take.items() if k in own}
    if not take:
        raise CheckpointError(f"{path}: no input_layer/body weights to initialise the encoder from")
    encoder.load_state_dict({k: v.float() for k, v in take.items()}, strict=False)
    return len(take)
