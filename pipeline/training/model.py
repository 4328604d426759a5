"""The model of training stage k and its checkpoints.

Stage 1 trains the first-stage encoder (initialised from IR-SE50 when ``pretrained.ir_se50`` is given and
fits); stage k > 1 loads the stage k-1 checkpoint, freezes all of it and trains one new refinement encoder.
The generator is always frozen. Checkpoints are in the official layout (``load_e2style`` reads them); the
resume point adds ``train_state`` (stage, step, optimizer, RNG).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from models.arcface import irse_encoder_init
from models.checkpoint import CheckpointError, e2style_from_checkpoint, irse_spec, load_stylegan2, read_checkpoint
from models.e2style import E2Style, build_encoder, face_pool
from models.factory import atomic_save, e2style_checkpoint, split_head_codes
from models.pretrained import plain_state_dict

from .config import TrainConfig, TrainConfigError
from .data import stream_seed
from .paths import stage_paths


def _latent_avg_for(G, n_latent: int, learn_in_w: bool) -> torch.Tensor:
    avg = getattr(G, "latent_avg", None)
    if avg is None:
        avg = G.mean_latent(4096)
    avg = avg.reshape(-1)[: G.style_dim].float()
    return avg.clone() if learn_in_w else avg.repeat(n_latent, 1)


def _small_head_init(enc: torch.nn.Module) -> None:
    # Small heads: the first codes stay near latent_avg (stage 1) or near the previous stage's (k > 1).
    for m in enc.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02 / math.sqrt(m.in_features))
            torch.nn.init.zeros_(m.bias)


def _maybe_init_irse(cfg: TrainConfig, enc: torch.nn.Module, include_input_layer: bool, log: Callable[[str], None]) -> None:
    mode = cfg.model.init_from_ir_se50
    path = cfg.pretrained.ir_se50
    if mode is False or path is None:
        if mode is True:
            raise TrainConfigError("model.init_from_ir_se50", "is true but pretrained.ir_se50 is not set")
        return
    sd = plain_state_dict(read_checkpoint(path), path)
    try:
        n = irse_encoder_init(enc, sd, path, include_input_layer)
        log(f"initialised the new encoder from {path} ({n} tensors)")
    except CheckpointError:
        if mode is True:
            raise
        log(f"not initialising from {path}: its widths do not fit model.encoder_base_width")


def _new_encoder(cfg: TrainConfig, in_channels: int, head_codes, widths, style_dim: int, first_stage: bool, log) -> torch.nn.Module:
    enc = build_encoder(in_channels, head_codes, widths, 50, style_dim)
    _small_head_init(enc)
    _maybe_init_irse(cfg, enc, first_stage, log)
    return enc


def _first_stage_model(cfg: TrainConfig, log) -> tuple[E2Style, torch.nn.Module]:
    m = cfg.model
    G = load_stylegan2(cfg.generator)
    base = m.encoder_base_width
    head_codes = None if m.learn_in_w else split_head_codes(G.n_latent)
    first = _new_encoder(cfg, 3, head_codes, (base, base * 2, base * 4, base * 8), G.style_dim, True, log)
    latent_avg = _latent_avg_for(G, G.n_latent, m.learn_in_w) if m.start_from_latent_avg else None
    return E2Style(first, [], G, latent_avg, m.start_from_latent_avg, m.learn_in_w, 3, 0), first


def _refinement_stage_model(cfg: TrainConfig, k: int, log) -> tuple[E2Style, torch.nn.Module]:
    m = cfg.model
    init = m.init_checkpoint if k == cfg.train.stages[0] and m.init_checkpoint else stage_paths(cfg, k - 1)["final"]
    prev = e2style_from_checkpoint(read_checkpoint(init), init)  # its kind and stages: paths.check_files
    first = prev.encoder_firststage
    sd = first.state_dict()
    style_dim = prev.decoder.style_dim
    head_codes = None if prev.learn_in_w else tuple(int(sd[f"output_layer_{i}.3.bias"].shape[0]) // style_dim for i in (3, 4, 5))
    new = _new_encoder(cfg, prev.input_nc + 3, head_codes, irse_spec(sd, init)["widths"], style_dim, False, log)
    refines = list(prev.encoder_refinestage_list)[: k - 2] + [new]
    model = E2Style(first, refines, prev.decoder, prev.latent_avg if prev.start_from_latent_avg else None,
                    prev.start_from_latent_avg, prev.learn_in_w, prev.input_nc, prev.label_nc)
    return model, new


def build_stage_model(cfg: TrainConfig, k: int, log: Callable[[str], None] = print) -> tuple[E2Style, torch.nn.Module]:
    """(model, trainable encoder) for training stage k: stages 1..k-1 loaded and frozen, stage k new."""
    torch.manual_seed(stream_seed(cfg.train.seed, "init", k))
    model, trainable = _first_stage_model(cfg, log) if k == 1 else _refinement_stage_model(cfg, k, log)
    model.requires_grad_(False)
    trainable.requires_grad_(True)
    # IR-SE units 22-24 are stored but never run: no gradient, so keep them out of DDP and the optimizer.
    for unit in list(trainable.body)[21:]:
        unit.requires_grad_(False)
    return model, trainable


def _wplus(codes: torch.Tensor, n_latent: int) -> torch.Tensor:
    return codes.unsqueeze(1).expand(-1, n_latent, -1) if codes.ndim == 2 else codes


def stage_forward(model, enc, k: int, x: torch.Tensor, randomize_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward of stage k: frozen stages 1..k-1 without gradients, then ``enc`` (the trainable
    encoder, possibly DDP-wrapped). Returns (y_hat pooled to 256, W+ or W codes of stage k)."""
    G = model.decoder
    n = G.n_latent

    def synth(c):
        return face_pool(G.synthesis(_wplus(c, n), randomize_noise=randomize_noise))

    def add_avg(c):
        if model.start_from_latent_avg:
            avg = model.latent_avg
            c = c + avg.reshape((1,) * (c.ndim - avg.ndim) + tuple(avg.shape)).to(c.dtype)
        return c

    if k == 1:
        codes = add_avg(enc(x))
    else:
        with torch.no_grad():
            codes = add_avg(model.encoder_firststage(x))
            for i in range(k - 2):
                codes = codes + model.encoder_refinestage_list[i](torch.cat((x, synth(codes).to(x.dtype)), 1))
            prev = synth(codes).to(x.dtype)
        codes = codes + enc(torch.cat((x, prev), 1))
    return synth(codes), codes


@torch.no_grad()
def validate_model(model, xs: torch.Tensor, stages: int, batch_size: int, device, lpips_net=None,
                   ws: torch.Tensor | None = None) -> dict[str, float]:
    """Per-stage held-out metrics: MSE and PSNR on a [0, 1] scale (per image, averaged), LPIPS when a net is
    given, latent MSE when the true w is known. Keys: ``stage{s}/mse`` etc."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(xs), batch_size):
        x = xs[i:i + batch_size].to(device)
        for s in range(1, stages + 1):
            out = model.invert(x, stages=s)
            r = out.images.float().clamp(-1, 1).add(1).div(2)
            t = x.float().clamp(-1, 1).add(1).div(2)
            mse = (r - t).pow(2).flatten(1).mean(1)
            psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
            acc = {f"stage{s}/mse": mse.sum(), f"stage{s}/psnr": psnr.sum()}
            if lpips_net is not None:
                acc[f"stage{s}/lpips"] = lpips_net.per_sample(out.images.float(), x.float()).sum()
            if ws is not None:
                w = ws[i:i + batch_size].to(device)
                acc[f"stage{s}/latent_mse"] = (out.codes - w.unsqueeze(1)).pow(2).flatten(1).mean(1).sum()
            for key, v in acc.items():
                sums[key] = sums.get(key, 0.0) + float(v)
        n += len(x)
    model.train(was)
    return {k: v / n for k, v in sums.items()}


def checkpoint_opts(cfg: TrainConfig, k: int, step: int) -> dict:
    """The official ``opts`` of a stage-k checkpoint at ``step`` (what it was trained with)."""
    L = cfg.loss
    return {"training_stage": k, "start_from_latent_avg": cfg.model.start_from_latent_avg, "learn_in_w": cfg.model.learn_in_w,
            "l2_lambda": L.l2, "lpips_lambda": L.lpips, "id_lambda": L.id, "parse_lambda": L.parse,
            "w_norm_lambda": L.w_norm, "latent_lambda": L.latent, "optim_name": cfg.optim.name,
            "learning_rate": cfg.optim.lr, "batch_size": cfg.train.batch_size, "max_steps": cfg.train.steps,
            "step": int(step), "stylegan_weights": cfg.generator, "data_mode": cfg.data.mode}


def save_checkpoint(path: str, model, cfg: TrainConfig, k: int, step: int, optimizer=None, extra: dict | None = None) -> None:
    """Official layout, on CPU, written atomically; with ``optimizer`` also the ``train_state`` to resume from."""
    ckpt = e2style_checkpoint(model, checkpoint_opts(cfg, k, step))
    ckpt["state_dict"] = {kk: v.cpu() for kk, v in ckpt["state_dict"].items()}
    ckpt["latent_avg"] = ckpt["latent_avg"].cpu()
    if optimizer is not None:
        ckpt["train_state"] = {
            "stage": k, "step": int(step), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **(extra or {}),
        }
    atomic_save(ckpt, path)


def load_resume_point(path: str, model, k: int) -> dict:
    """Load the weights of a stage-k resume checkpoint into ``model``; returns its ``train_state``."""
    ck = read_checkpoint(path)
    ts = ck.get("train_state")
    if ts is None or int(ts.get("stage", -1)) != k:
        raise RuntimeError(f"{path}: not a stage-{k} training checkpoint (no matching train_state)")
    model.load_state_dict({kk: (v.float() if v.is_floating_point() else v) for kk, v in ck["state_dict"].items()}, strict=True)
    return ts


def restore_rng(train_state: dict, device: torch.device) -> None:
    torch.set_rng_state(train_state["rng_cpu"])
    if device.type == "cuda" and train_state.get("rng_cuda"):
        try:
            torch.cuda.set_rng_state_all(train_state["rng_cuda"])
        except Exception:  # noqa: BLE001 - another GPU count: keep the fresh CUDA RNG
            pass
