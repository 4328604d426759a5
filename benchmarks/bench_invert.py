"""Model-only inversion speed and accuracy on whatever GPU is present, variants side by side in one run.

Method: full-size official architecture (IR-SE50 encoders, 1024px StyleGAN2, 3 stages) with seeded random weights
(speed does not depend on the values); uint8 256px crops of real photographs already on the device
(normalisation timed). Each variant gets its own copy of the model. Per case (stages, with reconstructions or
latents only): the first call is timed by the wall clock (for compiled variants it holds the compilation:
"compile s" is that call less the median), then `--warmup` untimed runs, then `--iters` runs each timed with CUDA
events; the median is reported, with the peak memory of those runs. Accuracy: the outputs of the last timed run
against the float32 reference (official per-sample grouped modulated convolution, TF32 off) on the same inputs:
codes max abs difference, max per-sample relative error of the codes, min per-sample PSNR of the 256 px
reconstruction. One table, printed last (also when `--time-limit` stops the run early).

    python benchmarks/bench_invert.py --out $OUT/bench.json                 # the generator levers, batch 64
    python benchmarks/bench_invert.py --smoke                               # CPU: checks the script, not speed

`--layer-bench`: the 1024 px StyledConv (32 -> 32 channels) and the 1024 and 512 px upsampling StyledConvs (64 -> 32,
128 -> 64) alone, batch `--batch`, fp16, NHWC: torch eager, torch.compile'd, and the fused Triton kernels
(models/stylegan2_kernels.py, models/stylegan2_upsample_kernel.py) autotuned (the setting it picked) and in each
setting it may pick, with each one's max per-sample relative error against float32 and the kernel's device check
(every setting, every batch size to 128) verdict and time; a second table.

    python benchmarks/bench_invert.py --variants "" --layer-bench --out $OUT/layers.json   # the layers alone
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.e2style import E2Style  # noqa: E402
from models.factory import build_e2style  # noqa: E402
from models.stylegan2 import StyledConv  # noqa: E402
from models.stylegan2_kernels import (CHECK_BATCHES, CONV_SETTINGS, _styled_conv3x3_tuned,  # noqa: E402
                                      check_styled_conv_kernel, fitting_settings, styled_conv3x3)
from models.stylegan2_upsample_kernel import (UPSAMPLE_SETTINGS, _styled_upconv3x3_tuned,  # noqa: E402
                                              check_upsample_kernel, styled_upconv3x3, upsample_phase_weights)

PHOTOS = ("tests/data/astronaut.jpg", "tests/data/grace_hopper.jpg")
REFERENCE_CHUNK = 16  # the float32 reference runs this many samples at a time (its grouped convolutions' memory)


@dataclass(frozen=True)
class Variant:
    precision: str
    modconv: str = "shared"
    channels_last: bool = True
    compile_mode: str | None = None  # None: eager; else one of models.e2style.COMPILE_MODES
    upsample: str = "auto"           # models.stylegan2.UPSAMPLE_FORMS ("auto": the official order on CUDA)
    kernels: bool = True             # optimize_for_gpu's rewrites (padded input convolutions, matmul RGB skip)
    pool_before_rgb: bool = False    # the 256 px reconstruction made without the 1024 px RGB image
    skip_upsample: str | None = None  # models.stylegan2.SKIP_UPSAMPLE_FORMS; None: what optimize_for_gpu sets
    fused_min_size: int | None = None  # StyledConvs from this size as the fused Triton kernels
    fused_upsample: bool = True      # the upsampling ones too (models/stylegan2_upsample_kernel.py)


AUTOTUNE = "max-autotune-no-cudagraphs"  # max-autotune's kernels, fit for the actor's own CUDA graph
# Eager variants take the upsampling form the code takes ("auto": the official order on CUDA; the folded 6x6 form
# is wrong there in float32 at batch 64, see models/stylegan2.py).
VARIANTS = {
    "fp32-reference": Variant("fp32", modconv="grouped", channels_last=False, kernels=False),
    "fp32-shared": Variant("fp32", channels_last=False, kernels=False),
    "bf16": Variant("bf16", kernels=False),
    "bf16-compile-tblur": Variant("bf16", compile_mode="default", upsample="transposed_blur", kernels=False),
    "fp16-compile-tblur": Variant("fp16", compile_mode="default", upsample="transposed_blur", kernels=False),
    "bf16-k": Variant("bf16"),
    # The pipeline's default on GPUs (fp16, compiled, kernel rewrites), then the generator's cheap levers.
    "fp16-compile-tblur-k": Variant("fp16", compile_mode="default", upsample="transposed_blur"),
    "fp16-compile-tblur-k-pool": Variant("fp16", compile_mode="default", upsample="transposed_blur", pool_before_rgb=True),
    "fp16-autotune-tblur-k": Variant("fp16", compile_mode=AUTOTUNE, upsample="transposed_blur"),
    "fp16-autotune-tblur-k-pool": Variant("fp16", compile_mode=AUTOTUNE, upsample="transposed_blur", pool_before_rgb=True),
    "fp16-compile-tblur-k-pool-phases": Variant("fp16", compile_mode="default", upsample="transposed_blur",
                                                pool_before_rgb=True, skip_upsample="phases"),
    # "-fused": the 1024 px non-upsampling layer as the fused kernel; "-fusedup": the 1024 px upsampling layer as
    # well (both kernels); "-fused512", "-fused256": both kernels for every layer from 512 or 256 px.
    "fp16-compile-tblur-k-pool-fused": Variant("fp16", compile_mode="default", upsample="transposed_blur",
                                               pool_before_rgb=True, fused_min_size=1024, fused_upsample=False),
    "fp16-compile-tblur-k-pool-fusedup": Variant("fp16", compile_mode="default", upsample="transposed_blur",
                                                 pool_before_rgb=True, fused_min_size=1024),
    "fp16-compile-tblur-k-pool-fused512": Variant("fp16", compile_mode="default", upsample="transposed_blur",
                                                  pool_before_rgb=True, fused_min_size=512),
    "fp16-compile-tblur-k-pool-fused256": Variant("fp16", compile_mode="default", upsample="transposed_blur",
                                                  pool_before_rgb=True, fused_min_size=256),
    "fp16-eager-k-pool-fused": Variant("fp16", pool_before_rgb=True, fused_min_size=1024, fused_upsample=False),
    "fp16-eager-k-pool-fusedup": Variant("fp16", pool_before_rgb=True, fused_min_size=1024),
    "fp16-eager-k-pool-fused256": Variant("fp16", pool_before_rgb=True, fused_min_size=256),
    "fp16-eager-k-pool": Variant("fp16", pool_before_rgb=True),  # the pooled path's fallback when compilation fails
    "fp32-eager-k": Variant("fp32"),
    "fp32-eager-k-pool": Variant("fp32", pool_before_rgb=True),
    "fp32-eager-k-pool-phases": Variant("fp32", pool_before_rgb=True, skip_upsample="phases"),
}
# Today's default first (the "x first" baseline), then the levers in order of need: --time-limit drops the tail.
LEVERS = ("fp16-compile-tblur-k", "fp16-compile-tblur-k-pool", "fp16-autotune-tblur-k-pool", "fp16-autotune-tblur-k",
          "fp16-compile-tblur-k-pool-phases", "fp16-compile-tblur-k-pool-fused", "fp16-compile-tblur-k-pool-fusedup",
          "fp16-compile-tblur-k-pool-fused256")
SMOKE_VARIANTS = ("fp32-eager-k", "fp32-eager-k-pool", "fp32-eager-k-pool-phases")
# Cases: stages and whether the reconstruction is returned ("3r": 3 stages with reconstructions, "3l": latents only).
CASES = {"3r": (3, True), "1r": (1, True), "3l": (3, False)}
# --layer-bench's layers: (output px, upsampling) of the generator's last layers.
BENCH_LAYERS = [(1024, False), (1024, True), (512, True)]


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


def configure(model: E2Style, v: Variant) -> E2Style:
    """``model`` (a fresh copy: the kernel rewrites cannot be undone) set up as the variant."""
    model.set_precision(v.precision, modconv=v.modconv)
    model.decoder.set_upsample_form(v.upsample)
    model.decoder.set_skip_upsample_form("auto")
    model._compiled = {}
    model.channels_last = False
    if v.channels_last or v.compile_mode or v.kernels or v.pool_before_rgb or v.fused_min_size:
        model.optimize_for_gpu(channels_last=v.channels_last, compile=v.compile_mode is not None, kernels=v.kernels,
                               compile_mode=v.compile_mode or "default", pool_before_rgb=v.pool_before_rgb,
                               fused_min_size=v.fused_min_size, fused_upsample=v.fused_upsample)
    if v.skip_upsample is not None:
        model.decoder.set_skip_upsample_form(v.skip_upsample)
    return model


def run_once(model: E2Style, u8: torch.Tensor, stages: int, recon: bool):
    return model.invert(model.preprocess_uint8(u8), stages=stages, return_images=recon)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(model: E2Style, u8: torch.Tensor, stages: int, recon: bool, warmup: int, iters: int,
              device: torch.device, graph: bool) -> dict:
    """The first call's wall time, the median of ``iters`` timed calls, their peak memory, the last output."""
    sync(device)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_once(model, u8, stages, recon)
        sync(device)
    first = time.perf_counter() - t
    for w in caught:  # a failed compilation runs eager (E2Style._call): the row must say so
        print(f"warning: {w.message}", flush=True)
    notes = [str(w.message)[:160] for w in caught if "running eager" in str(w.message)]
    graphed = False
    if graph and device.type == "cuda" and model._compiled:  # as the actor runs a compiled model
        model._graphs = {}
        graphed = model.capture_invert(u8.shape[0], stages, recon, keep_free=0.0)
    for _ in range(warmup):
        run_once(model, u8, stages, recon)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run_once(model, u8, stages, recon)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            out = run_once(model, u8, stages, recon)
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    model._graphs = {}  # a graph holds its activations' memory: one case's at a time
    return {"first_s": first, "median_s": statistics.median(times), "peak_gib": peak, "graph": graphed, "out": out,
            "notes": notes}


def reference(model: E2Style, u8: torch.Tensor, stages: int) -> dict:
    """Codes and reconstructions of the float32 grouped (official) formulation, REFERENCE_CHUNK samples at a time."""
    configure(model, VARIANTS["fp32-reference"])
    codes, images = [], []
    for i in range(0, len(u8), REFERENCE_CHUNK):
        out = run_once(model, u8[i:i + REFERENCE_CHUNK], stages, True)
        codes.append(out.codes.cpu())
        images.append(out.images.cpu())
    return {"codes": torch.cat(codes).double(), "images": torch.cat(images).double()}


def accuracy(out, ref: dict) -> dict:
    """Codes max abs difference and max per-sample relative error; min per-sample PSNR of the reconstructions."""
    codes = out.codes.detach().cpu().double()
    diff = (codes - ref["codes"]).flatten(1)
    acc = {"codes_max_abs": float(diff.abs().max()),
           "codes_rel_max": float((diff.norm(dim=1) / ref["codes"].flatten(1).norm(dim=1)).max()),
           "psnr_min_db": float("nan")}
    if out.images is not None:
        mse = (out.images.detach().cpu().double().clamp(-1, 1) - ref["images"].clamp(-1, 1)).pow(2).flatten(1).mean(1)
        acc["psnr_min_db"] = float((10 * torch.log10(4.0 / mse.clamp_min(1e-30))).min())  # images span [-1, 1]
    return acc


def median_s(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs (CUDA events on a GPU), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def styled_layer(channels_in: int, channels_out: int, upsample: bool, device: torch.device) -> StyledConv:
    """A StyledConv in the shared form (upsampling in the official order, the CUDA default), non-zero noise and bias."""
    torch.manual_seed(0)
    layer = StyledConv(channels_in, channels_out, 3, 512, upsample=upsample).to(device).eval()
    layer.conv.mode = "shared"
    layer.conv.upsample_impl = "transposed_blur"
    layer.noise.weight.fill_(0.1)
    layer.activate.bias.normal_(0, 0.1)
    return layer


@torch.no_grad()
def layer_bench(device: torch.device, batch: int, size: int, channels_in: int, channels_out: int, upsample: bool,
                warmup: int, iters: int, check_batches) -> list[dict]:
    """One StyledConv (output ``size`` px) in fp16 NHWC: torch eager, compiled, and the fused kernel autotuned and
    in each launch setting the autotuner may pick."""
    layer = styled_layer(channels_in, channels_out, upsample, device)
    in_size = size // 2 if upsample else size
    x = torch.randn(batch, channels_in, in_size, in_size, device=device).contiguous(memory_format=torch.channels_last)
    style, noise = torch.randn(batch, 512, device=device), torch.randn(1, 1, size, size, device=device)
    x16 = x.half()
    ref = torch.cat([layer(x16[i:i + 8].float(), style[i:i + 8], noise) for i in range(0, batch, 8)])  # float32

    def torch_path(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.float16):
                return fn(x16, style, noise)
        return run

    def fused(settings):
        def run():
            conv = layer.conv
            s = conv.modulation(style)
            weight = conv.scale * conv.weight[0]
            demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + conv.eps)
            if upsample:
                out = styled_upconv3x3(x16.permute(0, 2, 3, 1), s, upsample_phase_weights(weight, conv.blur.kernel),
                                       demod, noise[:, 0], layer.noise.weight, layer.activate.bias, settings=settings)
            else:
                out = styled_conv3x3(x16.permute(0, 2, 3, 1), s, weight.permute(2, 3, 1, 0), demod, noise[:, 0],
                                     layer.noise.weight, layer.activate.bias, settings=settings)
            return out.permute(0, 3, 1, 2)
        return run

    all_settings = UPSAMPLE_SETTINGS if upsample else CONV_SETTINGS
    settings = fitting_settings(all_settings, channels_in, channels_out)
    paths = [("torch eager", torch_path(layer)), ("torch.compile", torch_path(torch.compile(layer, dynamic=False))),
             ("fused kernel, autotuned", fused(None))]
    paths += [(f"fused kernel {t}", fused(t)) for t in settings]
    t = time.perf_counter()
    check_fn = check_upsample_kernel if upsample else check_styled_conv_kernel
    check = check_fn(device, channels_in, channels_out, torch.float16, batches=check_batches)
    check_s = time.perf_counter() - t
    layer_name = f"{'upsampling ' if upsample else ''}{channels_in}->{channels_out} @ {size} px"
    rows = []
    # The activations read once and the output written once.
    min_bytes = x16.numel() * x16.element_size() + batch * channels_out * size * size * 2
    for name, fn in paths:
        t = time.perf_counter()
        try:
            out = fn()
            sync(device)
        except Exception as e:  # noqa: BLE001 - a setting the device refuses (shared memory): reported, not fatal
            rows.append({"layer": layer_name, "path": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        first = time.perf_counter() - t
        err = ((out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
        del out
        median = median_s(fn, warmup, max(1, iters), device)
        row = {"layer": layer_name, "path": name, "ms": median * 1e3, "first_call_s": first, "rel_err_max": err,
               "effective_gb_s": min_bytes / median / 1e9, "device_check": check or "passed",
               "device_check_s": check_s}
        if name.endswith("autotuned") and device.type == "cuda":
            tuned = _styled_upconv3x3_tuned if upsample else _styled_conv3x3_tuned
            row["autotuned_to"] = str(tuned.best_config)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(LEVERS), help="comma-separated names of VARIANTS, the first is "
                   "the baseline of the 'x first' column; all: " + ",".join(VARIANTS))
    p.add_argument("--cases", default="3r,1r,3l", help="3r: 3 stages with reconstructions, 1r: 1 stage, 3l: 3 stages "
                   "latents only")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--graph", action="store_true", help="compiled variants replayed as one CUDA graph per call "
                   "(E2Style.capture_invert), as the pipeline's actor runs them")
    p.add_argument("--recompile", action="store_true", help="compiled variants compiled once more after "
                   "torch._dynamo.reset(): the compilation with warm inductor caches (an actor's restart)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; no variant starts after it (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="512 px narrow model, batch 2, eager fp32 variants unless "
                   "--variants names others: checks the script on a CPU, not the speed")
    p.add_argument("--layer-bench", action="store_true", help="also the 1024 px StyledConv and the 1024 and 512 px "
                   "upsampling StyledConvs alone: torch against the fused Triton kernels (with --smoke: 32 px layers "
                   "on the CPU, under TRITON_INTERPRET=1); --variants '' for these alone")
    p.add_argument("--profile", default="", help="variant to profile (top CUDA kernels, the first case)")
    p.add_argument("--out", default="", help="JSON of every row; rows are also appended to OUT + 'l' as they come")
    a = p.parse_args()
    start = time.time()
    device = torch.device(a.device)
    # The pipeline leaves cudnn.benchmark off; the reference is true float32 (TF32 would be a reduced precision).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Three encoders of one class per variant: past dynamo's default limit of 8 compilations per code object, a
    # network would silently run eager.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    names = a.variants.split(",") if not (a.smoke and a.variants == p.get_default("variants")) else list(SMOKE_VARIANTS)
    names = [n for n in names if n]  # --variants "": no model rows (with --layer-bench: the layers alone)
    unknown = [n for n in names if n not in VARIANTS] + [c for c in a.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown variants or cases: {unknown}; variants: {sorted(VARIANTS)}, cases: {sorted(CASES)}")
    cases = a.cases.split(",")
    batch, warmup, iters = (2, 0, 1) if a.smoke else (a.batch, a.warmup, a.iters)
    resolution, width = (512, 16) if a.smoke else (1024, 512)
    if a.smoke:
        torch.manual_seed(0)
    with torch.device(device):
        base = build_e2style(resolution, stages=3, width=width, seed=0).eval()
    print(f"built {resolution}px 3-stage model on {device} in {time.time() - start:.1f}s; "
          f"{sum(q.numel() for q in base.parameters()) / 1e6:.0f}M parameters", flush=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    u8 = real_inputs(batch, seed=1).to(device)
    refs = {}
    for stages in sorted({CASES[c][0] for c in cases}) if names else ():
        refs[stages] = reference(base, u8, stages)
    base = base.cpu()  # each variant gets a device copy: its peak memory is its own
    sync(device)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"float32 reference at batch {batch}: {time.time() - start:.0f}s", flush=True)

    log = open(a.out + "l", "a") if a.out else None
    rows, skipped = [], []
    for name in names:
        if a.time_limit and time.time() - start > a.time_limit:
            skipped.append(name)
            continue
        v = VARIANTS[name]
        if v.compile_mode is not None:
            # Dynamo's guards of earlier variants' networks (the same classes' code) go; inductor's caches stay, so
            # a later variant compiles graphs seen before (the encoders) faster: "compile s" depends on the order.
            torch._dynamo.reset()
        model = copy.deepcopy(base).to(device)
        sync(device)
        t = time.perf_counter()
        model = configure(model, v)  # the fused kernels' device checks run here
        setup_s = time.perf_counter() - t
        for case in cases:
            stages, recon = CASES[case]
            try:
                r = time_case(model, u8, stages, recon, warmup, iters, device, a.graph)
            except torch.OutOfMemoryError:
                print(f"{name} {case}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            row = {"variant": name, "case": case, "stages": stages, "recon": recon, "batch": batch,
                   "img_per_s": batch / r["median_s"], "ms_per_batch": r["median_s"] * 1e3, "peak_gib": r["peak_gib"],
                   "first_call_s": r["first_s"], "compile_s": r["first_s"] - r["median_s"], "graph": r["graph"],
                   **accuracy(r["out"], refs[stages]), "settings": asdict(v), "notes": r["notes"],
                   "fused_layers": sum(bool(layer.fused_dtypes) for layer in model.decoder.convs), "setup_s": setup_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        if a.recompile and v.compile_mode is not None and rows and rows[-1]["variant"] == name:
            torch._dynamo.reset()
            stages, recon = CASES[cases[0]]
            sync(device)
            t = time.perf_counter()
            run_once(model, u8, stages, recon)
            sync(device)
            warm = time.perf_counter() - t
            for row in rows:
                if row["variant"] == name:
                    row["recompile_s"] = warm - row["ms_per_batch"] / 1e3 if row["case"] == cases[0] else None
        if a.profile == name and device.type == "cuda":
            stages, recon = CASES[cases[0]]
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_once(model, u8, stages, recon)
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None

    layer_rows = []
    if a.layer_bench:
        # The smoke run: a 32 px layer of 16 channels under Triton's interpreter, its device check at 2 batch sizes.
        check_batches = (1, 2) if a.smoke else CHECK_BATCHES
        for size, upsample in BENCH_LAYERS if not a.smoke else [(32, False), (32, True)]:
            channels = base.decoder.channels  # the full model's (1024 px); the smoke run's: 16
            cin, cout = (16, 16) if a.smoke else (channels[size // 2 if upsample else size], channels[size])
            layer_rows += layer_bench(device, batch, size, cin, cout, upsample, warmup, iters, check_batches)

    base_speed = {r["case"]: r["img_per_s"] for r in rows if r["variant"] == names[0]}
    print(f"\n### {gpu}, torch {torch.__version__}, batch {batch}, {time.time() - start:.0f}s")
    print("| variant | case | img/s | x first | ms/batch | peak GiB | compile s | warm recompile s | graph | "
          "codes max abs | codes rel max | PSNR min dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['img_per_s'] / base_speed[r['case']]:.2f}" if r["case"] in base_speed else ""
        warm = r.get("recompile_s")
        compile_s = f"{r['compile_s']:.1f}" if r["settings"]["compile_mode"] else ""  # eager: nothing to compile
        print(f"| {r['variant']} | {r['case']} | {r['img_per_s']:.4g} | {ratio} | {r['ms_per_batch']:.1f} | "
              f"{r['peak_gib']:.1f} | {compile_s} | {'' if warm is None else f'{warm:.1f}'} | "
              f"{'yes' if r['graph'] else 'no'} | {r['codes_max_abs']:.1e} | {r['codes_rel_max']:.1e} | "
              f"{r['psnr_min_db']:.1f} |")
    for r in rows:
        for note in r["notes"]:
            print(f"{r['variant']} {r['case']}: {note}")
    if skipped:
        print(f"not run (time limit): {', '.join(skipped)}")
    if layer_rows:
        print(f"\n#### StyledConvs alone (batch {batch}, fp16 NHWC); GB/s: the input read once and the output "
              f"written once over the time; device check: every setting at batch sizes {check_batches[0]} to "
              f"{check_batches[-1]}")
        print("| layer | path | ms | GB/s | rel err max vs fp32 | first call s | device check (s) | autotuned to |")
        print("|---|---|---|---|---|---|---|---|")
        for r in layer_rows:
            if "error" in r:
                print(f"| {r['layer']} | {r['path']} | {r['error']} | | | | | |")
                continue
            print(f"| {r['layer']} | {r['path']} | {r['ms']:.2f} | {r['effective_gb_s']:.0f} | "
                  f"{r['rel_err_max']:.1e} | {r['first_call_s']:.1f} | {r['device_check']} "
                  f"({r['device_check_s']:.1f}) | {r.get('autotuned_to', '')} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "batch": batch, "rows": rows, "not_run": skipped,
                       "layer_rows": layer_rows}, f, indent=1)
    return 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
