"""GPU equivalence check: every inference path the code can take on a GPU, at every batch size, per sample.

Three parts, one table each, printed last; exit status 1 on any violation, 2 when a cell could not run
(time limit, memory):

1. Paths. Every combination the code can run on a GPU: precision fp32 / bf16 / fp16 x eager / torch.compile x
   kernel rewrites on / off (on CUDA the generator always upsamples in the official order, "transposed_blur":
   the folded forms hit cuDNN defects, see models/stylegan2.py), including the pipeline's default (fp16,
   compiled, rewrites on) and its fallback when compilation fails (the same, eager); compiled paths also as the
   actor runs them, replayed as a CUDA graph (E2Style.capture_invert: "-graph" rows, with whether their bits
   are the same path's unrecorded); "-pool" paths make the 256 px reconstruction without the 1024 px RGB image
   (optimize_for_gpu's pool_before_rgb), "-fused" ones run the 1024 px non-upsampling layer as the fused Triton
   kernel, "-fusedup" both 1024 px layers, "-fused256" every StyledConv from 256 px (upsampling ones included)
   as the fused kernels (a row notes a fused path whose layers did not all pass their device check),
   "-autotune" ones compile in
   max-autotune mode (compiled "-fused*" and "-autotune" paths run only when named in --compiled-paths).
   Full-size official architecture (IR-SE50 encoders, StyleGAN2 1024, 3 stages, reconstructions) with seeded
   random weights, real photo crops. Each sample against the float32 grouped (official) reference on
   the same GPU, computed 4 samples at a time (TF32 off). Bounds: float32 paths relative error <= 1e-4 of the
   codes and of the 256 px images; bf16/fp16 paths codes <= 1e-2 and reconstructions >= 40 dB PSNR.
2. Convolutions. Every convolution shape the shared-weight paths run (captured from the model itself, with
   its dtype and memory layout), at every batch size, on random data, against float64 on the same GPU:
   float32 <= 1e-4, bf16/fp16 <= 1e-2 relative error per sample. Plus the reproduction of the cuDNN defect
   that made the dropped sub-pixel upsampling wrong (reported, not a violation: it is the library's).
3. The float32 reference itself against float64 on the CPU, for a few samples (<= 1e-4).

Compiled paths run in parallel worker processes (compilation is CPU-bound), each specialised per batch size
as the pipeline does (it pads every batch to model.batch_size); the (path, batch) cells are dealt out to the
workers in turn, so one path's batch sizes compile in parallel.

    python benchmarks/check_gpu.py --out $OUT/check.json
    python benchmarks/check_gpu.py --tiny --device cpu --batch-sizes 2 --compile-batches "" --compile-batches-nok "" --skip-sweep   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_invert import real_inputs  # noqa: E402
from models.e2style import E2Style  # noqa: E402
from models.factory import build_e2style  # noqa: E402

FP32_BOUND = 1e-4
REDUCED_CODES_BOUND = 1e-2
REDUCED_PSNR_BOUND = 40.0
REDUCED_CONV_BOUND = 1e-2
FULL = (1024, 512)  # the official architecture: resolution, width
TINY = (512, 16)  # --tiny: narrow, but above 256 px so the "-pool" paths pool before the ToRGB
# "-fused": the generator's 1024 px non-upsampling layer through its kernel; "-fusedup": both 1024 px layers
# (the upsampling one through models/stylegan2_upsample_kernel.py); "-fused256": every StyledConv from 256 px.
FUSED = {"fused": (1024, False), "fusedup": (1024, True), "fused256": (256, True)}  # (fused_min_size, fused_upsample)
REF_CHUNK = 4  # the reference runs 4 samples at a time (the defect seen so far is right at batch 2 and 4)


@dataclass(frozen=True)
class InferencePath:
    precision: str
    compile: bool
    kernels: bool
    graph: bool = False  # replayed as a CUDA graph (compiled paths on CUDA; the actor's way)
    pool: bool = False  # optimize_for_gpu's pool_before_rgb
    compile_mode: str = "default"  # models.e2style.COMPILE_MODES
    fused: str = ""  # one of FUSED: layers as the fused Triton kernels (models/stylegan2_kernels.py)

    @property
    def name(self) -> str:
        compiled = ("autotune" if self.compile_mode != "default" else "compile") if self.compile else "eager"
        name = f"{self.precision}-{compiled}-{'k' if self.kernels else 'nok'}"
        return name + "-pool" * self.pool + (f"-{self.fused}" if self.fused else "") + "-graph" * self.graph

    def gpu_settings(self, on_gpu: bool) -> dict:
        """optimize_for_gpu's arguments for this path."""
        return {"channels_last": on_gpu, "compile": self.compile, "kernels": self.kernels,
                "compile_mode": self.compile_mode, "pool_before_rgb": self.pool,
                "fused_min_size": FUSED[self.fused][0] if self.fused else None,
                "fused_upsample": FUSED[self.fused][1] if self.fused else True}


# The pipeline's default on GPUs; when its compilation fails at first use, InferencePath("fp16", False, True)
# runs instead (one of EAGER_PATHS).
PIPELINE_DEFAULT = InferencePath("fp16", True, True)
# The candidate default: the same with the reconstruction made at 256 px (its fallback: fp16-eager-k-pool).
POOLED_DEFAULT = InferencePath("fp16", True, True, pool=True)
PRECISIONS = ("fp32", "bf16", "fp16")
EAGER_PATHS = ([InferencePath(p, False, k) for k in (False, True) for p in PRECISIONS]
               + [InferencePath(p, False, True, pool=True) for p in PRECISIONS]
               + [InferencePath("fp16", False, True, pool=True, fused=f) for f in FUSED])
# Compiled: rewrites on first (what the pipeline runs), the default first of all.
COMPILED_PATHS = [PIPELINE_DEFAULT, POOLED_DEFAULT] + [InferencePath(p, True, k) for k in (True, False) for p in PRECISIONS
                                                       if (p, k) != ("fp16", True)]
# Run only when --compiled-paths names them (max-autotune compiles for minutes per batch size; the fused kernel is
# not a default yet).
NAMED_ONLY_PATHS = [InferencePath("fp16", True, True, pool=pool, compile_mode="max-autotune-no-cudagraphs")
                  for pool in (False, True)] + [InferencePath("fp16", True, True, pool=True, fused=f) for f in FUSED]


def configure(model: E2Style, path: InferencePath, on_gpu: bool) -> E2Style:
    """Set ``model`` (built with or without the kernel rewrites, to match ``path``) up as the pipeline does."""
    model.set_precision(path.precision, modconv="shared")
    model._compiled = {}
    model.optimize_for_gpu(**path.gpu_settings(on_gpu))
    return model


def load_model(weights: str, device: torch.device, kernels: bool, tiny: bool) -> E2Style:
    resolution, width = TINY if tiny else FULL
    with torch.device("meta"):
        model = build_e2style(resolution, stages=3, width=width, seed=0)
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(state["model"], assign=True)
    model.latent_avg = state["latent_avg"]
    model = model.to(device).eval()
    if kernels:
        model.optimize_for_gpu(channels_last=device.type == "cuda", compile=False, kernels=True)
    return model


def per_sample_rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||a_i - ref_i|| / ||ref_i|| per sample, in float64, a few samples at a time (bounded memory)."""
    out = []
    for i in range(0, len(a), 4):
        x, r = a[i:i + 4].double().flatten(1), ref[i:i + 4].to(a.device).double().flatten(1)
        out.append(((x - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).cpu())
    return torch.cat(out)


def per_sample_psnr(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mse = (a.double().clamp(-1, 1) - ref.double().to(a.device).clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-30))).cpu()  # images span [-1, 1]: peak-to-peak 2


def judge(path: InferencePath, batch: int, codes, images, ref) -> dict:
    codes_err = per_sample_rel(codes, ref["codes"][:batch])
    image_err = per_sample_rel(images, ref["images"][:batch])
    psnr = per_sample_psnr(images, ref["images"][:batch])
    finite = bool(torch.isfinite(codes).all() and torch.isfinite(images).all())
    if path.precision == "fp32":
        ok = finite and codes_err.max() <= FP32_BOUND and image_err.max() <= FP32_BOUND
    else:
        ok = finite and codes_err.max() <= REDUCED_CODES_BOUND and psnr.min() >= REDUCED_PSNR_BOUND
    worst = int(torch.argmax(codes_err))
    return {"path": path.name, "batch": batch, "ok": bool(ok), "codes_rel_err_max": float(codes_err.max()),
            "images_rel_err_max": float(image_err.max()), "psnr_min_db": float(psnr.min()), "worst_sample": worst,
            "finite": finite}


def fused_layers(model: E2Style) -> int:
    return sum(bool(layer.fused_dtypes) for layer in model.decoder.convs)


def expected_fused_layers(model: E2Style, path: InferencePath) -> int:
    """The StyledConvs a fused path asks for (layer k of Generator.convs is at 8 * 2 ** (k // 2) px)."""
    min_size, upsample = FUSED[path.fused]
    return sum(2 ** (k // 2 + 3) >= min_size and (upsample or k % 2 == 1) for k in range(len(model.decoder.convs)))


def run_path(model: E2Style, path: InferencePath, batches: list[int], inputs: torch.Tensor, ref: dict,
             device: torch.device, deadline: float, log) -> list[dict]:
    rows = []
    for b in batches:
        if time.time() > deadline:
            rows.append({"path": path.name, "batch": b, "ok": None, "note": "not run: out of time"})
            continue
        t = time.time()
        graph_row = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                x = model.preprocess_uint8(inputs[:b])
                out = model.invert(x, return_images=True)
            row = judge(path, b, out.codes, out.images, ref)
            if path.fused:
                row["fused_layers"] = fused_layers(model)
                if device.type == "cuda" and row["fused_layers"] != expected_fused_layers(model, path):
                    row.update(ok=None, note=f"only {row['fused_layers']} layers fused: a device check failed "
                                             "(its warning says which)")
            if path.compile and device.type == "cuda":
                # The actor replays compiled inversion as a CUDA graph (E2Style.capture_invert): checked as a
                # path of its own against the reference, and told whether it gives the bits of the same path
                # unrecorded (and whether that path repeats its own bits: library kernels may not).
                again = model.invert(x, return_images=True)
                row["repeat_equal"] = bool(torch.equal(again.codes, out.codes) and torch.equal(again.images, out.images))
                del again
                graph_path = dataclasses.replace(path, graph=True)
                # keep_free 0: the check's processes share the GPU; the actor's memory rule is not checked here.
                if model.capture_invert(b, return_images=True, keep_free=0.0):
                    graphed = model.invert(x, return_images=True)
                    graph_row = judge(graph_path, b, graphed.codes, graphed.images, ref)
                    graph_row["equal_to_unrecorded"] = bool(torch.equal(graphed.codes, out.codes)
                                                            and torch.equal(graphed.images, out.images))
                    model._graphs = {}
                    del graphed
                else:
                    graph_row = {"path": graph_path.name, "batch": b, "ok": None, "note": "CUDA graph capture failed"}
            del out
            fell_back = [str(w.message)[:200] for w in caught if "running eager" in str(w.message)]
            if path.compile and fell_back:  # what ran is the eager fallback, checked as its own path
                row.update(ok=None, note="compilation failed: " + fell_back[0])
                model._compiled = {}
                model.optimize_for_gpu(**path.gpu_settings(device.type == "cuda"))
        except torch.OutOfMemoryError:
            row = {"path": path.name, "batch": b, "ok": None, "note": "out of memory (this process's share)"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["seconds"] = round(time.time() - t, 1)
        for r in (row, graph_row) if graph_row is not None else (row,):
            rows.append(r)
            print(json.dumps(r), file=log, flush=True)
    return rows


# --- convolution sweep -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCall:
    in_shape: tuple  # without the batch
    weight_shape: tuple
    bias: bool
    stride: tuple
    padding: tuple
    dilation: tuple
    transposed: bool
    output_padding: tuple
    groups: int
    dtype: str
    channels_last: bool

    def name(self) -> str:
        kind = "convT" if self.transposed else "conv"
        layout = "NHWC" if self.channels_last else "NCHW"
        return (f"{kind} {self.in_shape}->{self.weight_shape} s{self.stride[0]} p{self.padding[0]} "
                f"g{self.groups} {self.dtype} {layout}")


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class ConvRecorder(TorchDispatchMode):
    """Records every aten.convolution the model dispatches (below autocast: the dtypes it really runs)."""

    def __init__(self):
        super().__init__()
        self.calls: set[ConvCall] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
            self.calls.add(ConvCall(tuple(x.shape[1:]), tuple(w.shape), bias is not None, tuple(stride),
                                    tuple(padding), tuple(dilation), bool(transposed), tuple(output_padding),
                                    int(groups), str(x.dtype).replace("torch.", ""), _is_channels_last(x)))
        return func(*args, **(kwargs or {}))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_conv(call: ConvCall, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype) -> torch.Tensor:
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    w = w.to(dtype).contiguous(memory_format=fmt) if w.dim() == 4 else w.to(dtype)
    return torch.ops.aten.convolution(x, w, None if b is None else b.to(dtype), list(call.stride), list(call.padding),
                                      list(call.dilation), call.transposed, list(call.output_padding), call.groups)


def sweep_conv(call: ConvCall, batches: list[int], device: torch.device, seed: int) -> dict:
    """Max per-sample relative error of ``call`` at each batch size against float64 on the same device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bmax = max(batches)
    x = torch.randn((bmax, *call.in_shape), device=device, generator=gen)
    fan_in = math.prod(call.weight_shape[1:]) if not call.transposed else call.weight_shape[0] * math.prod(call.weight_shape[2:])
    w = torch.randn(call.weight_shape, device=device, generator=gen) / math.sqrt(fan_in)
    b = torch.randn(call.weight_shape[1 if call.transposed else 0] * (call.groups if call.transposed else 1),
                    device=device, generator=gen) if call.bias else None
    dtype = DTYPES[call.dtype]
    # Reference: float64 of the same (rounded) operands, a few samples at a time.
    xr, wr = x.to(dtype).double(), w.to(dtype).double()
    br = b.to(dtype).double() if b is not None else None
    ref = torch.cat([run_conv(call, xr[i:i + 8], wr, br, torch.float64) for i in range(0, bmax, 8)])
    bound = FP32_BOUND if dtype == torch.float32 else REDUCED_CONV_BOUND
    errs = {}
    for bsz in batches:
        try:
            out = run_conv(call, x[:bsz], w, b, dtype)
        except torch.OutOfMemoryError:
            errs[bsz] = None
            continue
        errs[bsz] = float(per_sample_rel(out, ref[:bsz]).max())
        del out
    del x, ref, xr
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bad = {k: v for k, v in errs.items() if v is None or not v <= bound}
    return {"conv": call.name(), "errors": errs, "bound": bound, "ok": not any(v is not None for v in bad.values()),
            "oom": [k for k, v in errs.items() if v is None]}


# cuDNN defects found on the H200 (torch 2.11+cu130, float32), the reason the generator takes the official
# upsampling order on CUDA: the dropped sub-pixel form's 64 -> 128 px convolution (wrong at batch >= 8) and
# the folded 6x6 transposed convolutions of the 512 and 1024 px layers (the "transposed" form, wrong at batch 64).
DEFECT_REPRO = [(ConvCall((512, 64, 64), (1024, 512, 3, 3), False, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, "float32", cl),
                 [2, 4, 8, 16, 32]) for cl in (False, True)]
DEFECT_REPRO += [(ConvCall((c, r, r), (c, c // 2, 6, 6), False, (2, 2), (2, 2), (1, 1), True, (0, 0), 1, "float32", True),
                  [16, 32, 64, 128]) for c, r in ((128, 256), (64, 512))]


# --- processes ---------------------------------------------------------------------------------------------

def path_batches(path: InferencePath, a) -> list[int]:
    """The batch sizes a compiled path is checked at (--compile-batches, or --compile-batches-nok without the
    rewrites)."""
    return [int(b) for b in (a.compile_batches if path.kernels else a.compile_batches_nok).split(",") if b]


def compiled_worker(a) -> None:
    """Runs the compiled (path, batch) cells named in --paths ("name:batch,..."); writes its rows as JSON lines to
    --rows. One model per path, its cells in the order given."""
    device = torch.device(a.device)
    if device.type == "cuda" and a.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(a.memory_fraction)
    # One process compiles each network at several batch sizes and precisions: dynamo's default limit of 8
    # compilations per function would silently fall back to eager.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    shared = torch.load(a.shared, weights_only=True)
    inputs, ref = shared["inputs"], {"codes": shared["codes"], "images": shared["images"]}
    deadline = a.deadline
    cells: dict[str, list[int]] = {}
    for cell in a.paths.split(","):
        name, batch = cell.rsplit(":", 1)
        cells.setdefault(name, []).append(int(batch))
    with open(a.rows, "a") as log:
        for name, batches in cells.items():
            path = next(p for p in COMPILED_PATHS + NAMED_ONLY_PATHS if p.name == name)
            model = configure(load_model(a.weights, device, path.kernels, a.tiny), path, device.type == "cuda")
            run_path(model, path, batches, inputs.to(device), ref, device, deadline, log)
            del model
            torch.cuda.empty_cache() if device.type == "cuda" else None


def reference(model: E2Style, inputs: torch.Tensor, on_gpu: bool) -> dict:
    model.set_precision("fp32", modconv="grouped")
    model._compiled = {}
    codes, images = [], []
    for i in range(0, len(inputs), REF_CHUNK):
        out = model.invert(model.preprocess_uint8(inputs[i:i + REF_CHUNK]), return_images=True)
        codes.append(out.codes)
        images.append(out.images)
    return {"codes": torch.cat(codes), "images": torch.cat(images)}


def float64_cpu_check(weights: str, inputs: torch.Tensor, ref: dict, n: int, tiny: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = load_model(weights, torch.device("cpu"), kernels=False, tiny=tiny).double()
    model.set_precision("fp32", modconv="grouped")
    x = (inputs[:n].permute(0, 3, 1, 2).double() / 127.5 - 1.0)
    out = model.invert(x, return_images=True)
    codes_err = per_sample_rel(ref["codes"][:n].cpu(), out.codes)
    image_err = per_sample_rel(ref["images"][:n].cpu(), out.images)
    ok = bool(codes_err.max() <= FP32_BOUND and image_err.max() <= FP32_BOUND)
    return {"samples": n, "codes_rel_err": codes_err.tolist(), "images_rel_err": image_err.tolist(), "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,2,4,16,32,64,128")
    p.add_argument("--compile-batches", default="1,2,4,16,32,64,128", help="compiled paths with kernel rewrites (the pipeline's)")
    p.add_argument("--compile-batches-nok", default="16,64", help="compiled paths without kernel rewrites (benchmarks only)")
    p.add_argument("--workers", type=int, default=3, help="processes compiling and running the compiled paths")
    p.add_argument("--memory-fraction", type=float, default=0.2, help="GPU memory share of each compiled worker")
    p.add_argument("--cpu-samples", type=int, default=2, help="samples checked against float64 on the CPU")
    p.add_argument("--time-limit", type=float, default=540, help="seconds; what is left unrun is reported as such")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="512px narrow model: checks the script, not the GPU")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--part", choices=("all", "eager", "compiled"), default="all",
                   help="eager: eager paths, convolution sweep, float64 CPU check; compiled: compiled paths (to split "
                        "the check over two device calls)")
    p.add_argument("--compiled-paths", default="",
                   help="only these compiled paths, comma-separated (e.g. fp16-compile-k, the pipeline's default; "
                        "fp16-autotune-k-pool)")
    p.add_argument("--out", default="")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--paths", default="", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="", help=argparse.SUPPRESS)
    p.add_argument("--shared", default="", help=argparse.SUPPRESS)
    p.add_argument("--rows", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    # True float32 everywhere, as the pipeline runs (it leaves cudnn.benchmark off).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.worker:
        compiled_worker(a)
        return 0

    named = a.compiled_paths.split(",") if a.compiled_paths else []
    unknown = [n for n in named if n not in {q.name for q in COMPILED_PATHS + NAMED_ONLY_PATHS}]
    if unknown:
        p.error(f"unknown --compiled-paths {unknown}; known: {[q.name for q in COMPILED_PATHS + NAMED_ONLY_PATHS]}")
    start = time.time()
    deadline = start + a.time_limit
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    batches = [int(b) for b in a.batch_sizes.split(",") if b]
    tmp = tempfile.mkdtemp(prefix="check_gpu_")
    weights, shared, rows_file = (os.path.join(tmp, n) for n in ("weights.pt", "shared.pt", "rows.jsonl"))

    # Weights built once on the CPU (seeded), shared by every process through one file.
    resolution, width = TINY if a.tiny else FULL
    cpu_model = build_e2style(resolution, stages=3, width=width, seed=0)
    torch.save({"model": cpu_model.state_dict(), "latent_avg": cpu_model.latent_avg}, weights)
    del cpu_model
    compile_batches = ([int(b) for b in (a.compile_batches + "," + a.compile_batches_nok).split(",") if b]
                       if a.part != "eager" else [])
    sizes = (batches if a.part != "compiled" else []) + compile_batches
    if not sizes:
        p.error("nothing to check: no batch sizes for this --part")
    inputs = real_inputs(max(sizes), seed=1)

    model = load_model(weights, device, kernels=False, tiny=a.tiny)
    ref = reference(model, inputs.to(device), on_gpu)
    torch.save({"inputs": inputs, "codes": ref["codes"].cpu(), "images": ref["images"].cpu()}, shared)
    print(f"reference: {len(inputs)} samples in {time.time() - start:.0f}s", flush=True)
    if a.part == "compiled":  # the GPU memory goes to the workers
        del model
        torch.cuda.empty_cache() if on_gpu else None

    # Compiled (path, batch) cells in worker processes, dealt out in turn (a path's batch sizes compile in parallel),
    # the default path's cells first.
    chosen = [q for q in COMPILED_PATHS + NAMED_ONLY_PATHS if q.name in named] if named else COMPILED_PATHS
    cells = [f"{q.name}:{b}" for q in chosen for b in path_batches(q, a)] if compile_batches else []
    procs = []
    n_workers = max(1, min(a.workers, len(cells))) if cells else 0
    for w in range(n_workers):
        mine = cells[w::n_workers]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--paths", ",".join(mine), "--weights", weights,
               "--shared", shared, "--rows", rows_file + f".{w}", "--deadline", str(deadline), "--device", a.device,
               "--compile-batches", a.compile_batches, "--compile-batches-nok", a.compile_batches_nok,
               "--memory-fraction", str(a.memory_fraction)] + (["--tiny"] if a.tiny else [])
        procs.append(subprocess.Popen(cmd))
    cpu_proc = None
    if a.cpu_samples and a.part != "compiled":
        cpu_out = os.path.join(tmp, "cpu64.json")
        code = ("import json,sys,torch; sys.argv=['x']; import check_gpu as c; "
                f"s=torch.load({shared!r}, weights_only=True); "
                f"r=c.float64_cpu_check({weights!r}, s['inputs'], s, {a.cpu_samples}, {a.tiny}, 6); "
                f"json.dump(r, open({cpu_out!r}, 'w'))")
        cpu_proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)))

    # Eager paths here, rewrites off first (that base model is already loaded).
    path_rows = []
    for kernels in (False, True) if a.part != "compiled" else ():
        if kernels:
            del model
            torch.cuda.empty_cache() if on_gpu else None
            model = load_model(weights, device, kernels=True, tiny=a.tiny)
        for path in [p for p in EAGER_PATHS if p.kernels == kernels]:
            path_rows += run_path(configure(model, path, on_gpu), path, batches, inputs.to(device), ref, device,
                                  deadline, sys.stdout)

    # Convolution sweep: the shapes every shared-weight eager path dispatches (compiled paths call the same
    # library convolutions for the same layers), at every batch size.
    conv_rows, repro_rows = [], []
    if not a.skip_sweep and a.part != "compiled":
        recorder = ConvRecorder()
        for path in [p for p in EAGER_PATHS if p.kernels]:
            configure(model, path, on_gpu)
            with recorder:
                model.invert(model.preprocess_uint8(inputs[:2].to(device)), return_images=True)
        del model
        torch.cuda.empty_cache() if on_gpu else None
        nok = load_model(weights, device, kernels=False, tiny=a.tiny)
        for path in [p for p in EAGER_PATHS if not p.kernels]:
            configure(nok, path, on_gpu)
            with recorder:
                nok.invert(nok.preprocess_uint8(inputs[:2].to(device)), return_images=True)
        del nok
        torch.cuda.empty_cache() if on_gpu else None
        print(f"{len(recorder.calls)} distinct convolutions", flush=True)
        for i, call in enumerate(sorted(recorder.calls, key=lambda c: (c.dtype, c.name()))):
            if time.time() > deadline:
                conv_rows.append({"conv": call.name(), "ok": None, "note": "not run: out of time"})
                continue
            conv_rows.append(sweep_conv(call, batches, device, seed=i))
        for call, sizes in DEFECT_REPRO if not a.tiny else []:
            repro_rows.append(sweep_conv(call, sizes, device, seed=99))

    for pr in procs:
        try:
            pr.wait(timeout=max(10, deadline - time.time() + 30))
        except subprocess.TimeoutExpired:  # a compilation past the time limit cannot be interrupted
            pr.kill()
    for w in range(n_workers):
        if os.path.exists(rows_file + f".{w}"):
            path_rows += [json.loads(line) for line in open(rows_file + f".{w}")]
    done = {(r["path"], r["batch"]) for r in path_rows}
    for path in chosen if cells else []:
        for b in path_batches(path, a):
            if (path.name, b) not in done:
                path_rows.append({"path": path.name, "batch": b, "ok": None, "note": "not run: out of time"})
    cpu64 = None
    if cpu_proc is not None:
        cpu_proc.wait(timeout=max(10, deadline - time.time() + 120))
        cpu64 = json.load(open(cpu_out)) if os.path.exists(cpu_out) else {"ok": False, "note": "did not finish"}

    gpu = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    violations = [r for r in path_rows if r.get("ok") is False] + [r for r in conv_rows if r.get("ok") is False]
    if cpu64 is not None and not cpu64.get("ok"):
        violations.append({"cpu_float64": cpu64})
    not_run = [r for r in path_rows + conv_rows if r.get("ok") is None]
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "paths": path_rows, "convs": conv_rows,
                       "defect_repro": repro_rows, "cpu_float64": cpu64, "seconds": time.time() - start}, f, indent=1)

    print(f"\n### check_gpu: {gpu}, torch {torch.__version__}, {time.time() - start:.0f}s")
    print("\n| path | " + " | ".join(f"b{b}" for b in sorted({r['batch'] for r in path_rows})) + " |")
    by_path: dict[str, dict[int, dict]] = {}
    for r in path_rows:
        by_path.setdefault(r["path"], {})[r["batch"]] = r
    all_b = sorted({r["batch"] for r in path_rows})
    print("|---|" + "---|" * len(all_b))
    for name, cells in by_path.items():
        def cell(r):
            if r is None:
                return ""
            if r.get("ok") is None:
                return r.get("note", "n/a")
            mark = "" if r["ok"] else " **FAIL**"
            if name.startswith("fp32"):
                return f"{max(r['codes_rel_err_max'], r['images_rel_err_max']):.1e}{mark}"
            return f"{r['codes_rel_err_max']:.1e} / {r['psnr_min_db']:.1f}{mark}"
        print(f"| {name} | " + " | ".join(cell(cells.get(b)) for b in all_b) + " |")
    print("(fp32: max per-sample relative error of codes and images; bf16/fp16: max codes error / min PSNR dB)")
    graphed = [r for r in path_rows if "equal_to_unrecorded" in r]
    if graphed:
        repeats = [r for r in path_rows if "repeat_equal" in r]
        print(f"CUDA graph replays (-graph rows): {sum(r['equal_to_unrecorded'] for r in graphed)} of {len(graphed)} "
              f"cells bit for bit equal to the same path unrecorded, which repeated its own bits in "
              f"{sum(r['repeat_equal'] for r in repeats)} of {len(repeats)}")
    if conv_rows:
        worst = {}
        for r in conv_rows:
            if r.get("errors"):
                key = r["conv"].split(" ")[-2]
                e = max((v for v in r["errors"].values() if v is not None), default=float("nan"))
                worst[key] = max(worst.get(key, 0.0), e)
        print(f"\nconvolutions: {len(conv_rows)} shapes x batches {batches}; worst per dtype: "
              + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
        for r in conv_rows:
            if r.get("ok") is False or r.get("oom"):
                print(f"  {'FAIL' if r.get('ok') is False else 'oom'}: {r['conv']} {r['errors']}")
    for r in repro_rows:
        errs = r["errors"]
        state = "still present" if any(v is not None and v > FP32_BOUND for v in errs.values()) else "not reproduced"
        print(f"cuDNN defect reproduction ({r['conv']}): {state}: {errs}")
    if cpu64 is not None:
        print(f"float32 reference vs float64 on the CPU: {cpu64}")
    print(f"\nviolations: {len(violations)}; not run: {len(not_run)}")
    return 1 if violations else 2 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
