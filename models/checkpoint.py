"""Loading official E2Style checkpoints and StyleGAN2 generators, safely.

Files are read with `torch.load(..., weights_only=True)`: a checkpoint that needs arbitrary
unpickling (a pickled class, a function, a `__reduce__` payload) is refused and nothing in it runs.
Architecture (stages, resolution, n_latent, input channels, widths) is inferred from the weights;
`opts` is honoured only where it changes the maths.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import torch

from .checkpoint_kinds import (SAFETENSORS, TORCH_ZIP, CheckpointError, describe_checkpoint, refused_pickle,
                               sniff_checkpoint)
from .e2style import E2Style, build_encoder
from .encoders import HEAD_NAMES, ir_se_blocks
from .stylegan2 import Generator, generator_config_from_state_dict

FIRST = "encoder_firststage."
REFINE = "encoder_refinestage_list."
DECODER = "decoder."
UNITS_TO_LAYERS = {len(ir_se_blocks(n)): n for n in (50, 100, 152)}


# torch's weights_only refusal names the global it would not import: "Unsupported global: GLOBAL io.open ...".
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a .pt/.pth (torch zip or legacy) or .safetensors file into a plain dict, never unpickling code.
    The file's kind is sniffed first (models.checkpoint_kinds): anything else is named as what it is."""
    path = os.fspath(path)
    kind = sniff_checkpoint(path)
    if kind == SAFETENSORS:
        return _read_safetensors(path)
    try:
        # mmap: tensors are paged in on use rather than read up front (zip-format files; legacy ones load whole).
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == TORCH_ZIP)
    except pickle.UnpicklingError as e:
        named = _REFUSED_GLOBAL.search(str(e))
        raise refused_pickle(path, f"its pickle names {named.group(1) if named else 'a class or function'} (a "
                                   f"pickled object, not only tensors)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise CheckpointError(f"{path}: a damaged PyTorch checkpoint (truncated or corrupt: "
                              f"{str(e).splitlines()[0]}); fetch the file again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a PyTorch file holding a {type(obj).__name__}, not a checkpoint dict")
    return obj


def e2style_state_dict(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The state_dict of an E2Style checkpoint; CheckpointError saying what the file is when it is not one."""
    what = describe_checkpoint(ckpt)
    if what != "an E2Style checkpoint":
        hint = (" (a generator goes to training's generator key, not to model.checkpoint)"
                if "generator" in what else "")
        raise CheckpointError(f"{path}: {what}, not an E2Style checkpoint ({{'state_dict': encoder_firststage.*, "
                              f"decoder.*, ...; 'latent_avg'; 'opts'}}){hint}")
    return ckpt["state_dict"]


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    out: dict[str, Any] = {}
    if "latent_avg" in tensors:
        out["latent_avg"] = tensors.pop("latent_avg")
    if "g_ema" in meta.get("format", ""):
        out["g_ema"] = tensors
    else:
        out["state_dict"] = tensors
    if "opts" in meta:
        out["opts"] = json.loads(meta["opts"])
    return out


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_and_load(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, path: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})" for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: {what} does not match the architecture inferred from its weights; " + "; ".join(problems))
    # Modules are built on the meta device (no random init, no memory) and adopt the file's tensors;
    # half-precision files (smaller to ship) are widened so the float32 path stays the reference.
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)


def irse_spec(sd: dict[str, torch.Tensor], path: str, what: str = "IR-SE state dict") -> dict[str, Any]:
    """num_layers and per-stage widths of an IR-SE body (an E2Style encoder, or the ArcFace backbone)."""
    if "input_layer.0.weight" not in sd:
        raise CheckpointError(f"{path}: {what} has no input_layer.0.weight")
    n_units = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    if n_units not in UNITS_TO_LAYERS:
        raise CheckpointError(f"{path}: {what} has {n_units} bottleneck units; IR-SE 50/100/152 have {sorted(UNITS_TO_LAYERS)}")
    num_layers = UNITS_TO_LAYERS[n_units]
    specs = ir_se_blocks(num_layers)
    starts = [0] + [i for i, s in enumerate(specs) if s.stride == 2][1:]
    widths = tuple(int(sd[f"body.{i}.res_layer.1.weight"].shape[0]) for i in starts)
    return {"num_layers": num_layers, "widths": widths}


def _encoder_spec(sd: dict[str, torch.Tensor], style_dim: int, what: str, path: str) -> dict:
    spec = irse_spec(sd, path, what)
    num_layers, widths = spec["num_layers"], spec["widths"]
    if "linear.weight" in sd:
        head_codes = None
    else:
        try:
            head_codes = tuple(int(sd[f"{name}.3.bias"].shape[0]) // style_dim for name in HEAD_NAMES)
        except KeyError as e:
            raise CheckpointError(f"{path}: {what} lacks the head {e.args[0]!r}") from None
    return {"in_channels": int(sd["input_layer.0.weight"].shape[1]), "head_codes": head_codes, "widths": widths, "num_layers": num_layers}


def build_generator(g_sd: dict[str, torch.Tensor], path: str, what: str = "generator") -> Generator:
    try:
        cfg = generator_config_from_state_dict(g_sd)
    except KeyError as e:
        raise CheckpointError(f"{path}: {what}: {e.args[0]}") from None
    with torch.device("meta"):
        G = Generator(cfg["size"], cfg["style_dim"], cfg["n_mlp"], channels=cfg["channels"])
    _check_and_load(G, g_sd, what, path)
    return G.eval().requires_grad_(False)


def e2style_from_checkpoint(ckpt: dict[str, Any], path: str = "<checkpoint>") -> E2Style:
    sd = e2style_state_dict(ckpt, path)
    opts = ckpt.get("opts") or {}
    if not isinstance(opts, dict):
        raise CheckpointError(f"{path}: 'opts' must be a dict, got {type(opts).__name__}")

    decoder = build_generator(_sub(sd, DECODER), path, "decoder")
    style_dim = decoder.style_dim

    first_sd = _sub(sd, FIRST)
    first_spec = _encoder_spec(first_sd, style_dim, "encoder_firststage", path)
    input_nc = first_spec["in_channels"]
    learn_in_w = first_spec["head_codes"] is None
    if "learn_in_w" in opts and bool(opts["learn_in_w"]) != learn_in_w:
        raise CheckpointError(f"{path}: opts.learn_in_w={opts['learn_in_w']} but the first-stage weights are those of "
                              f"{'a single-W encoder' if learn_in_w else 'a W+ encoder with three heads'}")
    if "input_nc" in opts and int(opts["input_nc"]) != input_nc:
        raise CheckpointError(f"{path}: opts.input_nc={opts['input_nc']} but encoder_firststage.input_layer.0.weight takes {input_nc} channels")
    label_nc = int(opts.get("label_nc") or 0)
    if label_nc and label_nc != input_nc:
        raise CheckpointError(f"{path}: opts.label_nc={label_nc} (one-hot label maps) but the encoder takes {input_nc} input channels")
    if not learn_in_w and sum(first_spec["head_codes"]) != decoder.n_latent:
        raise CheckpointError(f"{path}: the encoder emits {sum(first_spec['head_codes'])} codes {first_spec['head_codes']} but the "
                              f"{decoder.size}px decoder takes n_latent={decoder.n_latent}")
    with torch.device("meta"):
        first = build_encoder(style_dim=style_dim, **first_spec)
    _check_and_load(first, first_sd, "encoder_firststage", path)

    refine_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith(REFINE)})
    if refine_ids != list(range(len(refine_ids))):
        raise CheckpointError(f"{path}: refinement stages must be numbered 0..n-1, found {refine_ids}")
    refines = []
    for i in refine_ids:
        what = f"encoder_refinestage_list.{i}"
        r_sd = _sub(sd, f"{REFINE}{i}.")
        spec = _encoder_spec(r_sd, style_dim, what, path)
        if spec["in_channels"] != input_nc + 3:
            raise CheckpointError(f"{path}: {what} takes {spec['in_channels']} channels; a refinement stage takes the "
                                  f"input ({input_nc}) plus the previous reconstruction (3) = {input_nc + 3}")
        if (spec["head_codes"] is None) != learn_in_w:
            raise CheckpointError(f"{path}: {what} emits codes of another form than the first stage (W vs W+)")
        with torch.device("meta"):
            enc = build_encoder(style_dim=style_dim, **spec)
        _check_and_load(enc, r_sd, what, path)
        refines.append(enc)

    start_from_latent_avg = bool(opts.get("start_from_latent_avg", True))
    latent_avg = ckpt.get("latent_avg")
    if start_from_latent_avg:
        if not isinstance(latent_avg, torch.Tensor):
            raise CheckpointError(f"{path}: opts.start_from_latent_avg is set but the checkpoint has no 'latent_avg' tensor")
        want = {(style_dim,), (1, style_dim)} if learn_in_w else {(decoder.n_latent, style_dim), (1, decoder.n_latent, style_dim)}
        if tuple(latent_avg.shape) not in want:
            raise CheckpointError(f"{path}: latent_avg has shape {tuple(latent_avg.shape)}, expected one of {sorted(want)}")
        latent_avg = latent_avg.float().reshape(-1, style_dim).squeeze(0) if learn_in_w else latent_avg.float().reshape(decoder.n_latent, style_dim)
    else:
        latent_avg = None
    model = E2Style(first, refines, decoder, latent_avg, start_from_latent_avg, learn_in_w, input_nc, label_nc)
    return model.eval().requires_grad_(False)


def load_e2style(path: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32") -> E2Style:
    """Load an official E2Style checkpoint ({'state_dict', 'latent_avg', 'opts'}) in eval mode."""
    path = os.fspath(path)
    model = e2style_from_checkpoint(read_checkpoint(path), path)
    model.set_precision(precision)
    return model.to(device)


def load_stylegan2(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Load a generator checkpoint {'g_ema': state_dict, 'latent_avg': tensor(512)} in eval mode."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    g_sd = ckpt.get("g_ema")
    if not isinstance(g_sd, dict):
        raise CheckpointError(f"{path}: {describe_checkpoint(ckpt)}, not a StyleGAN2 generator checkpoint "
                              f"({{'g_ema': state_dict, 'latent_avg'}})")
    G = build_generator(g_sd, path, "g_ema")
    latent_avg = ckpt.get("latent_avg")
    if isinstance(latent_avg, torch.Tensor):
        G.register_buffer("latent_avg", latent_avg.float().reshape(-1)[: G.style_dim].clone(), persistent=False)
    return G.to(device)


def save_safetensors(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an E2Style or generator checkpoint dict as safetensors (opts as JSON metadata)."""
    from safetensors.torch import save_file

    is_generator = "g_ema" in ckpt
    tensors = {k: v.contiguous() for k, v in (ckpt["g_ema"] if is_generator else ckpt["state_dict"]).items()}
    if isinstance(ckpt.get("latent_avg"), torch.Tensor):
        tensors["latent_avg"] = ckpt["latent_avg"].contiguous()
    meta = {"format": "g_ema" if is_generator else "e2style"}
    if ckpt.get("opts") is not None:
        meta["opts"] = json.dumps(ckpt["opts"])
    save_file(tensors, os.fspath(path), metadata=meta)

