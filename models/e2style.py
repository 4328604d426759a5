"""The multi-stage E2Style model: a first-stage encoder, refinement encoders, a frozen StyleGAN2 decoder.

Stage 1: codes = E1(x) (+ latent_avg). Stage k > 1: codes += E_k(concat(x, pool256(G(codes_{k-1})))).
Each stage's reconstruction is the generator output average-pooled to 256x256 (the official `face_pool`); with
``pool_before_rgb`` the generator makes it at 256 px directly (Generator.synthesis's ``pool_to``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import E2StyleEncoder, WEncoder, pad_input_channels
from .stylegan2 import Generator, Upsample

POOLED_SIZE = 256
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Operand dtypes the generator's fused kernels are checked and used for, per precision (fp16: bf16 too, for the
# batches invert recomputes in bf16 after an fp16 overflow).
FUSED_DTYPES = {"fp32": (torch.float32,), "bf16": (torch.bfloat16,), "fp16": (torch.float16, torch.bfloat16)}
# torch.compile modes of optimize_for_gpu. "max-autotune" also records each compiled network as CUDA graphs of
# its own; "max-autotune-no-cudagraphs" autotunes the same kernels (Triton convolution and matmul templates
# against the libraries') without them, the form that fits inside capture_invert's one graph.
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class InversionOutput:
    codes: torch.Tensor  # (B, n_latent, style_dim), W+ after the last stage run, average latent included
    images: torch.Tensor | None  # (B, 3, 256, 256), that stage's reconstruction; None in latents-only mode


def face_pool(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images, (POOLED_SIZE, POOLED_SIZE))


class InversionGraph:
    """One E2Style._invert call (all its stages) recorded as a CUDA graph at one input shape, stage count and
    precision, replayed for later inputs of that shape. The GPU then gets a batch's thousands of kernels from
    one launch: a host thread busy elsewhere (an actor's alignment, holding the GIL) no longer leaves it idle
    between kernels. Its input and outputs are static buffers: each call copies the input in and clones the
    outputs out under a lock, after the previous call's clones on whatever stream that call used, so calls from
    several threads never see each other's data."""

    def __init__(self, run, example: torch.Tensor):
        # Warm-up on a side stream (what capture needs: every lazy initialisation done), then the capture.
        self.input = torch.zeros_like(example)
        current = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(example.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                run(self.input)
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work during the capture is not the capture's concern.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = run(self.input)
        self.lock = threading.Lock()
        self.done = torch.cuda.Event()  # the last call's outputs cloned: the buffers are free again
        self.done.record(current)

    def __call__(self, x: torch.Tensor) -> InversionOutput:
        with self.lock, torch.inference_mode():
            stream = torch.cuda.current_stream(self.input.device)
            stream.wait_event(self.done)  # a call from another stream may still be using the buffers
            self.input.copy_(x)
            self.graph.replay()
            out = self.output
            result = InversionOutput(out.codes.clone(), None if out.images is None else out.images.clone())
            self.done.record(stream)
            return result


class E2Style(nn.Module):
    def __init__(self, encoder_firststage: nn.Module, encoder_refinestage_list: list[nn.Module], decoder: Generator, latent_avg: torch.Tensor | None, start_from_latent_avg: bool = True, learn_in_w: bool = False, input_nc: int = 3, label_nc: int = 0):
        super().__init__()
        self.encoder_firststage = encoder_firststage
        self.encoder_refinestage_list = nn.ModuleList(encoder_refinestage_list)
        self.decoder = decoder
        # Official checkpoints keep latent_avg beside the state_dict, not in it: not persistent here either.
        self.register_buffer("latent_avg", latent_avg if latent_avg is not None else torch.zeros(decoder.style_dim), persistent=False)
        self.start_from_latent_avg = start_from_latent_avg
        self.learn_in_w = learn_in_w
        self.input_nc = input_nc
        self.label_nc = label_nc
        self.precision = "fp32"
        self.channels_last = False  # set by optimize_for_gpu
        self.pool_before_rgb = False  # set by optimize_for_gpu: reconstructions made at 256 px (see _reconstruct)
        self._compiled: dict = {}   # name -> torch.compile'd callable, filled by optimize_for_gpu
        self._graphs: dict = {}     # (input shape, stages, return_images, precision) -> InversionGraph

    @property
    def num_stages(self) -> int:
        return 1 + len(self.encoder_refinestage_list)

    @property
    def n_latent(self) -> int:
        return self.decoder.n_latent

    @property
    def resolution(self) -> int:
        return self.decoder.size

    def set_precision(self, precision: str, modconv: str = "shared") -> None:
        """Arithmetic of `invert`/`decode`: fp32, or bf16/fp16 autocast. The modulated convolutions use the
        shared-weight form by default; modconv="grouped" selects the official per-sample form, kept as
        the float32 reference. Both compute the same function (the fixture tests run through both)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.decoder.set_modconv_mode(modconv)

    def optimize_for_gpu(self, channels_last: bool = True, compile: bool = False, kernels: bool = True,
                         compile_mode: str = "default", pool_before_rgb: bool = False,
                         fused_min_size: int | None = None, fused_upsample: bool = True) -> "E2Style":
        """channels_last activations (what cuDNN's tensor-core kernels want) and, optionally, torch.compile
        of the encoders and the synthesis network (fuses the elementwise epilogues) in ``compile_mode`` (one of
        COMPILE_MODES). Compilation happens on first use; if it fails there, the eager modules are used and a
        warning says why.

        kernels: two rewrites of the same maths that GPU libraries run faster: the encoders' 3/6-channel
        input convolutions zero-padded to 8 channels, and the generator's RGB-skip upsampling as two matrix
        products (see BENCHMARKS.md). Inference only: the padded weights change the state dict.

        pool_before_rgb: the generator's last layer average-pools its activations to 256 px before its ToRGB
        (the same function: Generator.synthesis's ``pool_to``), so no 1024 px RGB image is made and, compiled,
        the pooling fuses into the last convolution's epilogue.

        fused_min_size: the generator's StyledConvs at this size and above as one fused Triton kernel each
        (models/stylegan2_kernels.py; the upsampling ones, models/stylegan2_upsample_kernel.py, unless
        ``fused_upsample`` is False), each layer where its kernel passed its device check at the layer's channels
        for the current precision's operands (fp16: bf16 too, the overflow fallback's); None: none."""
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.channels_last = channels_last
        self.pool_before_rgb = pool_before_rgb
        device = self.latent_avg.device
        self.decoder.set_fused_styled_convs(fused_min_size, fused_upsample, FUSED_DTYPES[self.precision],
                                            trusted=lambda layer, dtype: layer.fused_kernel_passes(device, dtype))
        self._graphs = {}  # recorded for the networks as they were
        if kernels:
            for enc in (self.encoder_firststage, *self.encoder_refinestage_list):
                if hasattr(enc, "input_layer"):
                    pad_input_channels(enc)
            for m in self.decoder.modules():
                if isinstance(m, Upsample):
                    m.form = "matmul"
        if channels_last:
            for m in self.modules():  # the generator's 5-D modulated weights stay as they are
                if isinstance(m, nn.Conv2d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        if compile:
            self._compiled = {}
            mode = None if compile_mode == "default" else compile_mode
            for name, fn in (("first", self.encoder_firststage), ("synthesis", self.decoder.synthesis)):
                self._compiled[name] = torch.compile(fn, dynamic=False, mode=mode)
            for i, enc in enumerate(self.encoder_refinestage_list):
                self._compiled[f"refine{i}"] = torch.compile(enc, dynamic=False, mode=mode)
        return self

    def capture_invert(self, batch: int, stages: int | None = None, return_images: bool = True,
                       size: int = POOLED_SIZE, keep_free: float = 0.25) -> bool:
        """Record invert at (batch, input_nc, size, size), these stages and the current precision as a CUDA graph
        (InversionGraph) that later invert calls of that shape replay. CUDA models only; call it after the
        compiled networks ran at this shape (torch.compile may not compile during a capture) and before other
        threads use the model. The graph keeps its activations' memory for itself: when less than ``keep_free``
        of the device's memory is left free beside it, it is dropped. Returns False, with a warning, when the
        capture fails or the graph is dropped: invert then runs as before."""
        device = self.latent_avg.device
        if device.type != "cuda":
            raise ValueError(f"capture_invert needs a CUDA model, this one is on {device}")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        example = torch.zeros((batch, self.input_nc, size, size), device=device).contiguous(memory_format=fmt)
        try:
            with torch.inference_mode():
                graph = InversionGraph(lambda x: self._invert(x, stages, return_images), example)
            free, total = torch.cuda.mem_get_info(device)
        except Exception as e:  # noqa: BLE001 - a capture the toolchain refuses: stay correct, run without
            warnings.warn(f"CUDA graph capture of invert failed ({type(e).__name__}: {e}); running without")
            return False
        if free < keep_free * total:  # the actor's other work (alignment, edits) needs memory of its own
            del graph
            torch.cuda.empty_cache()
            warnings.warn(f"CUDA graph of invert dropped: {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free "
                          f"beside it (less than {keep_free:.0%}); running without")
            return False
        self._graphs[self._graph_key(example.shape, stages, return_images)] = graph
        return True

    def _graph_key(self, shape, stages: int | None, return_images: bool) -> tuple:
        """What a recorded graph is valid for: the input shape, the stages run, the images, the precision."""
        return tuple(shape), self.num_stages if stages is None else int(stages), bool(return_images), self.precision

    def _call(self, name: str, eager, *args, **kwargs):
        compiled = self._compiled
        if name in compiled:
            try:
                return compiled[name](*args, **kwargs)
            except Exception as e:  # an unsupported toolchain (no Triton, no compiler): stay correct, run eager
                warnings.warn(f"torch.compile of {name} failed ({type(e).__name__}: {e}); running eager")
                compiled.pop(name)
        return eager(*args, **kwargs)

    def preprocess_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 (pinned host or device memory) -> (B, C, H, W) float in [-1, 1] on the model's
        device. The copy is non-blocking and the normalisation runs on the device: a quarter of the bytes
        of a float32 transfer."""
        device = self.latent_avg.device
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _encode_first(self, x: torch.Tensor) -> torch.Tensor:
        codes = self._call("first", self.encoder_firststage, x)
        if self.start_from_latent_avg:
            codes = codes + self.latent_avg.reshape((1,) * (codes.ndim - self.latent_avg.ndim) + tuple(self.latent_avg.shape)).to(codes.dtype)
        return codes

    def _wplus(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.unsqueeze(1).expand(-1, self.n_latent, -1) if codes.ndim == 2 else codes

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """codes -> face_pool(G(codes)), the 256 px reconstruction; with pool_before_rgb made at 256 px."""
        wplus = self._wplus(codes).contiguous()
        if self.pool_before_rgb:
            return self._call("synthesis", self.decoder.synthesis, wplus, pool_to=POOLED_SIZE)
        return face_pool(self._call("synthesis", self.decoder.synthesis, wplus))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """W+ codes -> 256x256 images with the stored noise (the official inference setting)."""
        with torch.no_grad(), self._autocast(codes.device):
            return self._reconstruct(codes).float()

    @torch.no_grad()
    def invert(self, x: torch.Tensor, stages: int | None = None, return_images: bool = True) -> InversionOutput:
        """x: (B, input_nc, 256, 256) in [-1, 1]. Runs stages 1..k; images are stage k's reconstruction.

        fp16 can overflow where bf16 cannot (5 exponent bits against 8): a batch whose fp16 result is not
        finite is recomputed in bf16, so overflow costs speed, never a wrong row. Inputs of a shape that
        capture_invert recorded replay its CUDA graph."""
        graph = self._graphs.get(self._graph_key(x.shape, stages, return_images))
        out = graph(x) if graph is not None else self._invert(x, stages, return_images)
        if self.precision == "fp16" and not (torch.isfinite(out.codes).all() and (out.images is None or torch.isfinite(out.images).all())):
            warnings.warn("fp16 overflow in a batch: recomputed in bf16")
            self.precision = "bf16"
            try:
                out = self._invert(x, stages, return_images)
            finally:
                self.precision = "fp16"
        return out

    def _invert(self, x: torch.Tensor, stages: int | None, return_images: bool) -> InversionOutput:
        stages = self.num_stages if stages is None else int(stages)
        if not 1 <= stages <= self.num_stages:
            raise ValueError(f"stages must be in 1..{self.num_stages} for this checkpoint, got {stages}")
        if x.ndim != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"expected input of shape (B, {self.input_nc}, H, W), got {tuple(x.shape)}")
        with self._autocast(x.device):
            codes = self._encode_first(x)
            images = None
            for k in range(1, stages):
                images = self._reconstruct(codes)
                refine_in = torch.cat((x.to(images.dtype), images), dim=1)
                codes = codes + self._call(f"refine{k - 1}", self.encoder_refinestage_list[k - 1], refine_in).to(codes.dtype)
            images = self._reconstruct(codes) if return_images else None
        codes = self._wplus(codes).float()
        return InversionOutput(codes=codes, images=images.float() if images is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.invert(x).images


def build_encoder(in_channels: int, head_codes: tuple[int, ...] | None, widths: tuple[int, int, int, int], num_layers: int, style_dim: int) -> nn.Module:
    if head_codes is None:
        return WEncoder(in_channels, widths, num_layers, style_dim)
    return E2StyleEncoder(in_channels, head_codes, widths, num_layers, style_dim)
