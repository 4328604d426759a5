"""What the fused StyledConv kernels' interpreter checks share (tests/models/test_generator_kernels_interpreted.py,
test_generator_upsample_kernel_interpreted.py): official float64 layers and their inputs, the kernels' operands
taken from a layer, the per-sample comparison, the device self-check's test against deliberately wrong kernels, a
small generator with non-zero noise strengths and biases, and the script's main."""
from __future__ import annotations

import os
from typing import Callable

import torch

from models.stylegan2 import Generator, StyledConv, default_channels

STYLE_DIM = 32  # the layers' style width here (the model's is 512)


def official_layer(cin: int, cout: int, seed: int, upsample: bool = False) -> StyledConv:
    """A StyledConv (3x3; upsampling or not) in float64 with non-zero noise strength and bias."""
    torch.manual_seed(seed)
    layer = StyledConv(cin, cout, 3, style_dim=STYLE_DIM, upsample=upsample).double()
    with torch.no_grad():
        layer.noise.weight.fill_(0.7)
        layer.activate.bias.normal_()
    return layer


def modulation_operands(layer: StyledConv, style: torch.Tensor):
    """The styles, the layer's (Cout, Cin, 3, 3) weight with its scale, and the demodulation, from its parameters."""
    conv = layer.conv
    s = conv.modulation(style)
    weight = conv.scale * conv.weight[0]
    return s, weight, torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + conv.eps)


def layer_inputs(layer: StyledConv, b: int, h: int, w: int, per_sample_noise: bool, seed: int):
    """Seeded float64 input (b, Cin, h, w), styles and noise (per sample or shared) at the layer's output size."""
    gen = torch.Generator().manual_seed(seed)
    grow = 2 if layer.conv.upsample else 1
    x = torch.randn(b, layer.conv.in_channel, h, w, generator=gen, dtype=torch.float64)
    style = torch.randn(b, layer.conv.modulation.weight.shape[1], generator=gen, dtype=torch.float64)
    noise = torch.randn(b if per_sample_noise else 1, 1, grow * h, grow * w, generator=gen, dtype=torch.float64)
    return x, style, noise


def per_sample_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest per-sample relative error (L2 over each sample) of ``out`` against ``ref``."""
    return ((out.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


def check_kernel_against_official(kernel: Callable, kernel_weight: Callable, shapes: list, settings: list,
                                  dtype: torch.dtype, bound: float, upsample: bool) -> None:
    """``kernel`` (styled_conv3x3's arguments) on every shape (b, h, w, cin, cout, per-sample noise) at every launch
    setting, its operands in ``dtype`` (weights from ``kernel_weight(weight, layer)``), within ``bound`` per
    sample of the official float64 layer."""
    for i, (b, h, w, cin, cout, per_sample_noise) in enumerate(shapes):
        layer = official_layer(cin, cout, seed=i, upsample=upsample)
        x, style, noise = layer_inputs(layer, b, h, w, per_sample_noise, seed=100 + i)
        with torch.no_grad():
            ref = layer(x, style, noise=noise).permute(0, 2, 3, 1)  # the official (grouped) form, float64
            s, weight, demod = modulation_operands(layer, style)
            for setting in settings:
                out = kernel(x.permute(0, 2, 3, 1).to(dtype), s.float(), kernel_weight(weight, layer).float(),
                             demod.float(), noise[:, 0].float(), float(layer.noise.weight),
                             layer.activate.bias.float(), settings=setting)
                assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape)
                err = per_sample_error(out, ref)
                assert err <= bound, f"{dtype} {shapes[i]} {setting}: per-sample relative error {err:.2e} > {bound:.0e}"
        print(f"  {dtype} {shapes[i]}: {err:.1e}")


def check_self_check_catches(module, name: str, self_check: Callable[[], str | None],
                             wrong: dict[str, Callable]) -> None:
    """Each of ``wrong`` (what the problem must say: a wrong kernel) put in place of ``module.name``: the device
    self-check (``self_check()``) reports a problem saying so."""
    right = getattr(module, name)
    for what, kernel in wrong.items():
        try:
            setattr(module, name, kernel)
            problem = self_check()
        finally:
            setattr(module, name, right)
        assert problem is not None and what in problem, (what, problem)


def random_generator(size: int = 64) -> Generator:
    """A narrow float32 generator (seed 0) whose noise strengths and biases are non-zero."""
    torch.manual_seed(0)
    G = Generator(size, channels=default_channels(2, size))
    for name, p in G.named_parameters():
        if name.endswith("noise.weight") or "bias" in name:
            p.data.normal_()
    return G


def run_checks_main(checks: list[Callable[[], None]]) -> None:
    """The check script's main: every check, ``PASS name`` after each (interpreter_run reads them)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test (TRITON_INTERPRET=1 before triton loads)"
    torch.set_num_threads(1)  # many small operations: a second thread only adds synchronisation on CI's 2 cores
    for check in checks:
        check()
        print(f"PASS {check.__name__}", flush=True)
