"""Model-only inversion speed and accuracy on whatever GPU is present.

Method: full-size official architecture (IR-SE50 encoders, 1024px StyleGAN2) with seeded random weights
(speed does not depend on the values); uint8 256px inputs already on the GPU (normalisation timed);
`--warmup` untimed runs, then `--iters` runs each timed with CUDA events; the median is reported.
Accuracy: each variant against the float32 reference (official grouped modulated convolution, TF32 off)
on the same real photographs: relative error of the final codes, PSNR of the 256px reconstruction.

    python benchmarks/bench_invert.py --batch-sizes 16,32,64 --out results.json
    python benchmarks/bench_invert.py --tiny --device cpu      # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.factory import build_e2style  # noqa: E402

PHOTOS = ("tests/data/astronaut.jpg", "tests/data/grace_hopper.jpg")

# name: (precision, modconv form, channels_last, torch.compile, upsample implementation, kernel rewrites).
# Eager variants take the form the code takes ("auto": the official order on CUDA; the folded 6x6 form is
# wrong there in float32 at batch 64, see models/stylegan2.py).
VARIANTS = {
    "fp32-reference": ("fp32", "grouped", False, False, "auto", False),
    "fp32-shared": ("fp32", "shared", False, False, "auto", False),
    "bf16": ("bf16", "shared", True, False, "auto", False),
    "bf16-compile-tblur": ("bf16", "shared", True, True, "transposed_blur", False),
    "fp16-compile-tblur": ("fp16", "shared", True, True, "transposed_blur", False),
    # optimize_for_gpu(kernels=True): 8-channel padded encoder input convs, matmul RGB-skip upsampling
    "bf16-k": ("bf16", "shared", True, False, "auto", True),
    "fp16-compile-tblur-k": ("fp16", "shared", True, True, "transposed_blur", True),
}


def real_inputs(batch: int, seed: int = 0) -> torch.Tensor:
    """Photographs cropped and flipped at random into a (B, 256, 256, 3) uint8 batch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    photos = [np.asarray(Image.open(os.path.join(root, p)).convert("RGB")) for p in PHOTOS if os.path.exists(os.path.join(root, p))]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        img = photos[i % len(photos)] if photos else rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) * 3 // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(img[y:y + s, x:x + s]).resize((256, 256), Image.Resampling.LANCZOS)
        arr = np.asarray(crop)
        out.append(arr[:, ::-1] if rng.random() < 0.5 else arr)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def configure(model, variant: str):
    """The model set up as ``variant``; variants with kernel rewrites get their own copy (the padded input
    convolutions cannot be undone), the others reuse ``model``."""
    precision, modconv, channels_last, compile_, upsample_impl, kernels = VARIANTS[variant]
    if kernels:
        model = copy.deepcopy(model)
    model.set_precision(precision, modconv=modconv)
    model.decoder.set_upsample_form(upsample_impl)
    for m in model.decoder.modules():
        if hasattr(m, "matmul"):
            m.matmul = False
    model._compiled = {}
    model.channels_last = False
    if channels_last or compile_:
        model.optimize_for_gpu(channels_last=channels_last, compile=compile_, kernels=kernels)
    return model


def run_once(model, u8: torch.Tensor, stages: int, recon: bool):
    return model.invert(model.preprocess_uint8(u8), stages=stages, return_images=recon)


def time_variant(model, u8, stages, recon, warmup, iters, device):
    for _ in range(warmup):
        run_once(model, u8, stages, recon)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_once(model, u8, stages, recon)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            run_once(model, u8, stages, recon)
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)  # images span [-1, 1]: peak-to-peak 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="16,32,64")
    p.add_argument("--stages", default="1,3")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reference-batch", type=int, default=16, help="the slow reference is timed at this batch only")
    p.add_argument("--compile-batches", default="32", help="compiled variants are timed at these batches only (one compile each)")
    p.add_argument("--acc-batch", type=int, default=32, help="batch of real photos for the accuracy comparison")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="64px narrow model: checks the script, not the GPU")
    p.add_argument("--profile", default="", help="variant to profile (top CUDA kernels at the largest batch, 3 stages)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    # The reference is true float32: TF32 would already be a reduced-precision variant.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    resolution, width = (64, 64) if a.tiny else (1024, 512)
    t0 = time.time()
    with torch.device(device):
        model = build_e2style(resolution, stages=3, width=width, seed=0)
    print(f"built {resolution}px 3-stage model on {device} in {time.time() - t0:.1f}s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    batches = [int(b) for b in a.batch_sizes.split(",")]
    stage_list = [int(s) for s in a.stages.split(",")]
    variants = a.variants.split(",")

    # Reference outputs for accuracy, on one batch of real photographs.
    acc_batch = real_inputs(a.acc_batch, seed=1).to(device)
    compile_batches = [int(b) for b in a.compile_batches.split(",")]
    log = open(a.out + "l", "a") if a.out else None
    ref_model = configure(model, "fp32-reference")
    ref = {s: run_once(ref_model, acc_batch, s, True) for s in stage_list}

    rows = []
    for v in variants:
        vm = configure(model, v)
        acc = {s: run_once(vm, acc_batch, s, True) for s in stage_list}
        for s in stage_list:
            code_err = ((acc[s].codes - ref[s].codes).norm() / ref[s].codes.norm()).item()
            rec_psnr = psnr(acc[s].images, ref[s].images)
            for recon in (True, False):
                for b in batches:
                    if v == "fp32-reference" and b != a.reference_batch:
                        continue
                    if VARIANTS[v][3] and b not in compile_batches:
                        continue
                    u8 = real_inputs(b).to(device)
                    try:
                        t, peak = time_variant(vm, u8, s, recon, a.warmup, a.iters, device)
                    except torch.OutOfMemoryError:
                        print(f"{v} stages={s} batch={b}: out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    row = {"variant": v, "stages": s, "recon": recon, "batch": b, "img_per_s": b / t, "ms_per_batch": t * 1e3,
                           "peak_gib": peak, "codes_rel_err": code_err, "recon_psnr_db": rec_psnr}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()

    ref_speed = {(r["stages"], r["recon"]): r["img_per_s"] for r in rows if r["variant"] == "fp32-reference"}
    if a.profile and device.type == "cuda":
        pm = configure(model, a.profile)
        u8 = real_inputs(max(batches)).to(device)
        for _ in range(2):
            run_once(pm, u8, 3, True)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_once(pm, u8, 3, True)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))

    print(f"\n### {gpu}, torch {torch.__version__}")
    print("| variant | stages | recon | batch | img/s | x fp32 ref | peak GiB | codes rel err | recon PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = ref_speed.get((r["stages"], r["recon"]))
        ratio = f"{r['img_per_s'] / base:.1f}" if base else ""
        print(f"| {r['variant']} | {r['stages']} | {'yes' if r['recon'] else 'no'} | {r['batch']} | {r['img_per_s']:.0f} | {ratio} | "
              f"{r['peak_gib']:.1f} | {r['codes_rel_err']:.1e} | {r['recon_psnr_db']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
