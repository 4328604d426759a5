"""Train the demo model: a narrow 3-stage E2Style against a narrow, random but fixed StyleGAN2, in synthetic
mode (w, G(w) pairs), then measure each stage's PSNR on held-out samples.

    python benchmarks/train_demo_model.py --out OUT [--time-budget 420] [--device cuda]

Needs only torch, numpy and pillow (no yaml, ray, s3fs): one process, one device. Writes into OUT:
    generator.pt              the generator {'g_ema', 'latent_avg'}, float16 tensors (the exact one trained against)
    e2style_demo.pt           3-stage E2Style, official layout {'state_dict', 'latent_avg', 'opts'}, float16 tensors
    demo_input/demo-000000.tar  held-out generator images (256 px PNG, WebDataset layout): the demo's input
    contact_sheet.png         rows: input, stage 1, stage 2, stage 3 reconstructions
    psnr.json                 held-out MSE/PSNR per stage (stage 0 = latent_avg alone), steps and seconds per stage
    run/                      the training run (per-stage checkpoints with optimizer state, metrics.jsonl, events)
Why these sizes: the file budget (generator + encoders <= 20 MB) with IR-SE50 at its minimum width 16 (the SE
gates divide by 16) leaves room for style_dim 32 only: each head is Linear(C*49, style_dim * codes).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.checkpoint import load_e2style, load_stylegan2, read_checkpoint  # noqa: E402
from models.factory import atomic_save, generator_checkpoint  # noqa: E402
from models.stylegan2 import Generator, default_channels  # noqa: E402
from pipeline.training.config import resolve_config  # noqa: E402
from pipeline.training.data import seeded_generator, synthetic_batch  # noqa: E402
from pipeline.training.loop import run_training  # noqa: E402
from pipeline.training.model import validate_model  # noqa: E402
from pipeline.training.paths import stage_paths  # noqa: E402


def half_state(d: dict) -> dict:
    return {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_shard(path: str, images: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for i, a in enumerate(images):
            for name, data in ((f"sample_{i:04d}.png", png_bytes(a)),
                               (f"sample_{i:04d}.json", json.dumps({"key": f"sample_{i:04d}", "source": "demo generator, held-out seed"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--style-dim", type=int, default=32)
    ap.add_argument("--gen-width", type=int, default=64, help="generator width knob (512 = official channels)")
    ap.add_argument("--n-mlp", type=int, default=8)
    ap.add_argument("--enc-width", type=int, default=16, help="IR-SE50 base width (16 = minimum, 64 = official)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--optim", default="ranger")
    ap.add_argument("--latent-weight", type=float, default=1.0, help="weight of the latent (w) loss beside L2 1.0")
    ap.add_argument("--steps", type=int, default=100000, help="max steps per stage (the time budget usually stops first)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole script (training gets the rest after setup)")
    ap.add_argument("--eval-reserve", type=float, default=45.0, help="seconds kept for export and evaluation")
    ap.add_argument("--stage-shares", default="0.4,0.3,0.3")
    ap.add_argument("--val-count", type=int, default=512, help="held-out samples for the final PSNR")
    ap.add_argument("--shard-count", type=int, default=16, help="images in the demo input shard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--num-threads", type=int, default=None)
    a = ap.parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.num_threads:
        torch.set_num_threads(a.num_threads)

    # 1. The fixed random generator, rounded to float16 first so the shipped half file is exactly it.
    torch.manual_seed(a.seed)
    G = Generator(a.resolution, a.style_dim, a.n_mlp, channels=default_channels(2, a.gen_width))
    with torch.no_grad():
        for t in G.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
        latent_avg = G.mean_latent(8192, seed=a.seed).half().float()
    gpath = os.path.join(out, "generator.pt")
    gck = generator_checkpoint(G, latent_avg)
    atomic_save({"g_ema": half_state(gck["g_ema"]), "latent_avg": gck["latent_avg"].half()}, gpath)
    G = load_stylegan2(gpath)

    # 2. Train stages 1..3 in synthetic mode.
    shares = [float(s) for s in a.stage_shares.split(",")]
    train_budget = max(1.0, a.time_budget - a.eval_reserve - (time.time() - t_start))
    run_dir = os.path.join(out, "run")
    results = []
    for k, share in zip((1, 2, 3), shares):
        cfg = resolve_config({
            "output_dir": run_dir, "generator": gpath,
            "loss": {"l2": 1.0, "lpips": 0.0, "id": 0.0, "parse": 0.0, "w_norm": 0.0, "latent": a.latent_weight},
            "model": {"encoder_base_width": a.enc_width},
            "optim": {"name": a.optim, "lr": a.lr},
            "train": {"stages": [k], "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed, "precision": a.precision,
                      "device": device, "log_every": 50, "val_every": 500, "save_every": 500,
                      "max_seconds": train_budget * share / sum(shares), "num_threads": a.num_threads},
            "data": {"mode": "synthetic", "val_count": 64, "val_batch_size": 64},
            "progress": False,
        })
        results += run_training(cfg)

    # 3. Export the float16 files.
    final = stage_paths(cfg, 3)["final"]
    ck = read_checkpoint(final)
    opts = dict(ck["opts"], demo={"resolution": a.resolution, "style_dim": a.style_dim, "gen_width": a.gen_width,
                                  "enc_width": a.enc_width, "seed": a.seed, "steps": [r.get("step") for r in results]})
    epath = os.path.join(out, "e2style_demo.pt")
    atomic_save({"state_dict": half_state(dict(ck["state_dict"])), "latent_avg": ck["latent_avg"].half(), "opts": opts}, epath)

    # 4. Held-out evaluation of the shipped (float16) model, and of the float32 one for comparison.
    model = load_e2style(epath, device=device)
    model32 = load_e2style(final, device=device)
    Gd = model.decoder
    avg_w = model.latent_avg.reshape(-1, Gd.style_dim)[0]
    xs, ws = [], []
    g = seeded_generator(a.seed, "heldout-demo")
    for i in range(0, a.val_count, 64):
        x, w = synthetic_batch(Gd, avg_w, min(64, a.val_count - i), g)
        xs.append(x.cpu())
        ws.append(w.cpu())
    xs, ws = torch.cat(xs), torch.cat(ws)
    m16 = validate_model(model, xs, 3, 64, device, None, ws)
    m32 = validate_model(model32, xs, 3, 64, device, None, ws)
    with torch.no_grad():
        base = model.decode(model.latent_avg.unsqueeze(0).to(device)).cpu()
        t = xs.clamp(-1, 1).add(1).div(2)
        mse0 = (base.clamp(-1, 1).add(1).div(2) - t).pow(2).flatten(1).mean(1)
    stage0 = {"mse": float(mse0.mean()), "psnr": float((10 * torch.log10(1 / mse0.clamp_min(1e-10))).mean())}

    # 5. Demo input shard and contact sheet.
    n = min(a.shard_count, len(xs))
    inputs = to_uint8(xs[:n])
    write_shard(os.path.join(out, "demo_input", "demo-000000.tar"), inputs)
    rows = [inputs]
    with torch.no_grad():
        for s in (1, 2, 3):
            rows.append(to_uint8(model.invert(xs[:n].to(device), stages=s).images))
    cols = min(n, 8)
    tile = 128
    sheet = Image.new("RGB", (cols * tile, len(rows) * tile), "white")
    for r, imgs in enumerate(rows):
        for c in range(cols):
            sheet.paste(Image.fromarray(imgs[c]).resize((tile, tile), Image.Resampling.NEAREST), (c * tile, r * tile))
    sheet.save(os.path.join(out, "contact_sheet.png"))

    sizes = {p: os.path.getsize(os.path.join(out, p)) for p in ("generator.pt", "e2style_demo.pt", "demo_input/demo-000000.tar")}
    report = {
        "heldout_samples": len(xs), "device": device, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "stage0_latent_avg": stage0,
        "fp16_files": {f"stage{s}": {"psnr": m16[f"stage{s}/psnr"], "mse": m16[f"stage{s}/mse"], "latent_mse": m16[f"stage{s}/latent_mse"]} for s in (1, 2, 3)},
        "fp32_checkpoint": {f"stage{s}": {"psnr": m32[f"stage{s}/psnr"], "mse": m32[f"stage{s}/mse"]} for s in (1, 2, 3)},
        "training": [{"stage": r["stage"], "steps": r.get("step"), "seconds": r.get("seconds"), "loss_first": r.get("loss_first"),
                      "loss_last": r.get("loss_last")} for r in results],
        "settings": vars(a), "file_bytes": sizes, "model_files_mb": round((sizes["generator.pt"] + sizes["e2style_demo.pt"]) / 1e6, 2),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    with open(os.path.join(out, "psnr.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("stage0_latent_avg", "fp16_files", "training", "model_files_mb", "wall_seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
