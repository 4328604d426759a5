"""Small random models from the factory: loading rules, shape inference, the official data flow."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers.paths import REPO_ROOT
from models import CheckpointError, load_e2style, load_stylegan2
from models.checkpoint import save_safetensors
from models.e2style import face_pool
from models.factory import build_e2style, e2style_checkpoint, generator_checkpoint, write_checkpoint
from models.stylegan2 import SKIP_UPSAMPLE_FORMS, Generator, Upsample, default_channels, upfirdn2d



def images(batch=2, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, 256, 256, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def small3(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "e2style_3stage.pt"
    write_checkpoint(path, resolution=32, stages=3, seed=1, width=32)
    return path


@pytest.mark.parametrize("resolution,stages", [(32, 1), (64, 2), (128, 3)])
def test_shape_inference(tmp_path, resolution, stages):
    path = write_checkpoint(tmp_path / "m.pt", resolution=resolution, stages=stages, width=32)
    m = load_e2style(path)
    n_latent = 2 * int(torch.log2(torch.tensor(resolution))) - 2
    assert (m.num_stages, m.resolution, m.n_latent, m.input_nc) == (stages, resolution, n_latent, 3)
    out = m.invert(images(), stages=stages)
    assert out.codes.shape == (2, n_latent, 512)
    assert out.images.shape == (2, 3, 256, 256)
    assert torch.isfinite(out.images).all()


def test_stages_follow_the_official_data_flow(small3):
    """codes_k = codes_{k-1} + E_k(concat(x, pool256(G(codes_{k-1})))), images = pool256(G(codes_k))."""
    m = load_e2style(small3)
    x = images()
    outs = [m.invert(x, stages=k) for k in (1, 2, 3)]
    with torch.no_grad():
        first = m.encoder_firststage(x) + m.latent_avg
        assert torch.allclose(outs[0].codes, first, atol=1e-6)
        for k in (1, 2):
            prev = outs[k - 1]
            assert torch.allclose(prev.images, face_pool(m.decoder.synthesis(prev.codes)), atol=1e-6)
            step = m.encoder_refinestage_list[k - 1](torch.cat((x, prev.images), dim=1))
            assert torch.allclose(outs[k].codes, prev.codes + step, atol=1e-5)
    assert m.invert(x).codes.equal(outs[2].codes)  # stages defaults to all stages in the file
    latents_only = m.invert(x, stages=3, return_images=False)
    assert latents_only.images is None and latents_only.codes.equal(outs[2].codes)
    with pytest.raises(ValueError, match="stages must be in 1..3"):
        m.invert(x, stages=4)


def test_heads_emit_codes_in_official_order(small3):
    """Coarse codes come from the deepest head (output_layer_3), fine ones from the shallowest (output_layer_5)."""
    m = load_e2style(small3)
    coarse, middle, fine = m.encoder_firststage.head_codes
    x = images()
    before = m.invert(x, stages=1).codes
    with torch.no_grad():
        m.encoder_firststage.output_layer_5[3].weight.zero_()
        m.encoder_firststage.output_layer_5[3].bias.zero_()
    after = m.invert(x, stages=1).codes
    assert torch.allclose(after[:, -fine:], m.latent_avg[-fine:].expand(2, -1, -1))
    assert after[:, : coarse + middle].equal(before[:, : coarse + middle])
    assert not after[:, -fine:].equal(before[:, -fine:])


@pytest.mark.parametrize("input_nc,label_nc", [(1, 0), (19, 19)])
def test_other_input_channels(tmp_path, input_nc, label_nc):
    path = write_checkpoint(tmp_path / "m.pt", resolution=32, stages=2, width=32, input_nc=input_nc, opts={"label_nc": label_nc})
    m = load_e2style(path)
    assert (m.input_nc, m.label_nc) == (input_nc, label_nc)
    assert m.encoder_refinestage_list[0].input_layer[0].in_channels == input_nc + 3
    assert m.invert(images(channels=input_nc)).codes.shape == (2, 8, 512)
    with pytest.raises(ValueError, match=f"expected input of shape \\(B, {input_nc}"):
        m.invert(images(channels=3 if input_nc != 3 else 1))


def test_learn_in_w_broadcasts_one_code(tmp_path):
    path = write_checkpoint(tmp_path / "w.pt", resolution=32, stages=2, width=32, learn_in_w=True)
    m = load_e2style(path)
    assert m.learn_in_w and m.latent_avg.shape == (512,)
    out = m.invert(images())
    assert out.codes.shape == (2, 8, 512)
    assert torch.equal(out.codes[:, 0:1].expand(-1, 8, -1), out.codes)  # one W for every layer
    with torch.no_grad():
        w1 = m.encoder_firststage(images()) + m.latent_avg
    assert torch.allclose(m.invert(images(), stages=1).codes[:, 0], w1, atol=1e-6)


def test_opts_contradicting_the_weights_are_refused(tmp_path):
    model = build_e2style(32, 1, 32)
    ck = e2style_checkpoint(model, {"input_nc": 1})
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="opts.input_nc=1"):
        load_e2style(tmp_path / "bad.pt")
    ck = e2style_checkpoint(model, {"start_from_latent_avg": False})
    torch.save(ck, tmp_path / "no_avg.pt")
    plain = load_e2style(tmp_path / "no_avg.pt")
    with torch.no_grad():
        assert torch.allclose(plain.invert(images(), stages=1).codes, model.encoder_firststage(images()), atol=1e-6)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    ck = e2style_checkpoint(build_e2style(32, 2, 32))
    sd = ck["state_dict"]
    del sd["encoder_firststage.body.5.res_layer.1.weight"]
    sd["encoder_firststage.body.5.extra"] = torch.zeros(1)
    sd["decoder.conv1.activate.bias"] = torch.zeros(7)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_e2style(tmp_path / "bad.pt")
    assert "decoder does not match" in str(err.value)
    assert "mis-shaped keys: conv1.activate.bias (7,) (expected (32,))" in str(err.value)
    # Fix the decoder so the encoder problems are reached.
    sd["decoder.conv1.activate.bias"] = torch.zeros(ck["state_dict"]["decoder.conv1.conv.weight"].shape[1])
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_e2style(tmp_path / "bad.pt")
    assert "missing keys: body.5.res_layer.1.weight" in str(err.value)
    assert "unexpected keys: body.5.extra" in str(err.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ck = e2style_checkpoint(build_e2style(32, 1, 32))
    ck["opts"]["payload"] = _RunsCode(str(marker))
    torch.save(ck, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        load_e2style(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_non_checkpoint_files_give_clear_errors(tmp_path, small3):
    data = small3.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: is a truncated or damaged zip"):
        load_e2style(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_e2style(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_e2style(tmp_path / "absent.pt")
    torch.save({"g_ema": {}}, tmp_path / "gen.pt")
    with pytest.raises(CheckpointError, match="gen.pt: a StyleGAN2 generator checkpoint .'g_ema'., not an E2Style"):
        load_e2style(tmp_path / "gen.pt")


def test_safetensors_equals_torch_file(tmp_path, small3):
    ck = torch.load(small3, weights_only=True)
    save_safetensors(ck, tmp_path / "m.safetensors")
    a, b = load_e2style(small3), load_e2style(tmp_path / "m.safetensors")
    x = images()
    assert a.invert(x).codes.equal(b.invert(x).codes)


def test_generator_any_resolution_widths_from_weights_noise_truncation(tmp_path):
    torch.manual_seed(0)
    G0 = Generator(128, channels=default_channels(1, 64))
    torch.save(generator_checkpoint(G0), tmp_path / "g.pt")
    G = load_stylegan2(tmp_path / "g.pt")
    for name, p in G.named_parameters():
        if name.endswith("noise.weight"):  # zero at init: make the noise matter
            p.data.fill_(0.5)
    assert (G.size, G.n_latent, G.channels[128]) == (128, 12, G0.channels[128])
    with torch.no_grad():
        z = torch.randn(2, 512)
        w = G.mapping(z)
        img = G.synthesis(w)
        assert img.shape == (2, 3, 128, 128)
        assert img.equal(G.synthesis(w)), "stored noise is deterministic"
        assert not G.synthesis(w, randomize_noise=True).equal(G.synthesis(w, randomize_noise=True))
        avg = G.latent_avg.expand(2, -1)
        assert torch.allclose(G.synthesis(w, truncation=0.0, truncation_latent=G.latent_avg), G.synthesis(avg), atol=1e-5)
        half = G.synthesis(w, truncation=0.5, truncation_latent=G.latent_avg)
        assert torch.allclose(half, G.synthesis(avg + 0.5 * (w - avg)), atol=1e-5)


@pytest.mark.parametrize("upsample,blur", [(False, (1, 3, 3, 1)), (True, (1, 3, 3, 1)), (True, (1, 2, 3, 4))])
def test_shared_weight_modulated_conv_equals_grouped_in_float64(upsample, blur):
    """The fast formulation (scale input, shared conv, demodulate output; blur folded into the transposed
    conv's kernel) is the official function."""
    from models.stylegan2 import UPSAMPLE_FORMS, ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(16, 8, 3, 32, upsample=upsample, blur_kernel=blur).double()
    x, s = torch.randn(3, 16, 8, 8, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    ref = conv(x, s)
    conv.mode = "shared"
    for impl in UPSAMPLE_FORMS:
        conv.upsample_impl = impl
        assert torch.allclose(conv(x, s), ref, rtol=1e-10, atol=1e-12), impl


def test_factory_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "cli.pt"
    subprocess.run([sys.executable, "-m", "models.factory", "--out", str(out), "--resolution", "32", "--stages", "2", "--seed", "3", "--width", "32"], check=True, cwd=REPO_ROOT)
    m = load_e2style(out)
    assert (m.num_stages, m.resolution) == (2, 32)
    ck = torch.load(out, weights_only=True)
    assert set(ck) == {"state_dict", "latent_avg", "opts"}
    assert any(k.startswith("encoder_refinestage_list.0.") for k in ck["state_dict"])


def test_fast_fir_upsample_equals_upfirdn2d_with_an_asymmetric_kernel():
    from models.stylegan2 import Upsample

    up = Upsample([1, 2, 3, 4]).double()
    up.kernel = torch.outer(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 1, 2, 5])).double()  # not separable-symmetric
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    ref = up(x)
    up.mode = "shared"
    fast = up(x)
    assert fast.shape == ref.shape == (2, 3, 10, 14)
    assert torch.allclose(fast, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["matmul", "phases"])
def test_skip_upsample_forms_equal_upfirdn2d(form):
    """The matrix and phase forms of the RGB skip's upsampling, and its pooled form, on a separable kernel that
    is not symmetric (a wrong flip or a swapped axis would show) and a non-square input."""
    up = Upsample([1, 3, 3, 1]).double()
    up.kernel = torch.outer(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 1, 2, 5])).double()
    x = torch.randn(2, 3, 6, 12, dtype=torch.float64)
    ref = upfirdn2d(x, up.kernel, up=2, pad=up.pad)
    up.form = form
    assert torch.allclose(up(x), ref, rtol=1e-12, atol=1e-12)
    for pool in (2, 4):
        assert torch.allclose(up.pooled(x, pool), F.avg_pool2d(ref, pool), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size,pool_to", [(64, 32), (128, 32), (64, 8), (32, 64), (64, 64)])
def test_pooled_synthesis_equals_pooling_the_image(size, pool_to):
    """synthesis(pool_to=p) (the last ToRGB on pooled activations, the skip's upsampling and pooling as one
    matrix) is adaptive_avg_pool2d(synthesis(), p) in float64, in both modulated convolution modes and every
    skip upsampling form; with noise, biases and styles that differ per layer and sample."""
    torch.manual_seed(size + pool_to)
    G = Generator(size, channels=default_channels(2, 32)).double()
    for name, p in G.named_parameters():
        if name.endswith("noise.weight") or "bias" in name:
            p.data.normal_()
    w = torch.randn(3, G.n_latent, 512, dtype=torch.float64)
    with torch.no_grad():
        ref = F.adaptive_avg_pool2d(G.synthesis(w), (pool_to, pool_to))
        assert ref.abs().max() > 0.1  # a test on near-zero images would prove little
        for mode in ("grouped", "shared"):
            G.set_modconv_mode(mode)
            for form in SKIP_UPSAMPLE_FORMS:
                G.set_skip_upsample_form(form)
                out = G.synthesis(w, pool_to=pool_to)
                assert out.shape == (3, 3, pool_to, pool_to)
                assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12), (mode, form)
    with pytest.raises(ValueError, match="skip upsampling form"):
        G.set_skip_upsample_form("fir")


def test_pool_before_rgb_keeps_the_function(tmp_path):
    """E2Style with pool_before_rgb (a 512 px generator: the last layer pooled 2x2 before its ToRGB) inverts and
    decodes as the model as loaded, in float64; off again, the model takes the full-size path."""
    path = write_checkpoint(tmp_path / "m512.pt", resolution=512, stages=2, seed=2, width=16)
    ref_model = load_e2style(path).double()
    fast = load_e2style(path).double().optimize_for_gpu(channels_last=False, kernels=True, pool_before_rgb=True)
    x = images().double()
    ref, out = ref_model.invert(x, stages=2), fast.invert(x, stages=2)  # stage 2's input holds stage 1's image
    assert torch.allclose(out.codes, ref.codes, rtol=1e-9, atol=1e-10)
    assert torch.allclose(out.images, ref.images, rtol=1e-9, atol=1e-10)
    codes = ref.codes.double()  # invert returns float32 codes whatever the model's dtype
    assert torch.allclose(fast.decode(codes), ref_model.decode(codes), rtol=1e-9, atol=1e-10)
    rgb_sizes = []  # what the last ToRGB made: the path taken, not only its result
    fast.decoder.to_rgbs[-1].register_forward_hook(lambda m, args, out: rgb_sizes.append(out.shape[-1]))
    fast.decode(codes)
    fast.optimize_for_gpu(channels_last=False, kernels=True)
    fast.decode(codes)
    assert rgb_sizes == [256, 512]
    with pytest.raises(ValueError, match="compile mode must be one of"):
        fast.optimize_for_gpu(compile=True, compile_mode="fastest")


def test_gpu_kernel_rewrites_keep_the_function(small3):
    """optimize_for_gpu(kernels=True) (8-channel padded input convolutions, matmul RGB-skip upsampling)
    inverts exactly as the model as loaded (float64, CPU); channels_last too."""
    ref_model = load_e2style(small3).double()
    x = images().double()
    ref = ref_model.invert(x, return_images=True)
    fast = load_e2style(small3).double().optimize_for_gpu(channels_last=True, compile=False, kernels=True)
    assert fast.encoder_firststage.input_layer[0].in_channels == 8
    assert fast.encoder_refinestage_list[0].input_layer[0].in_channels == 8
    out = fast.invert(x, return_images=True)
    assert torch.allclose(out.codes, ref.codes, rtol=1e-9, atol=1e-10)
    assert torch.allclose(out.images, ref.images, rtol=1e-9, atol=1e-10)


def test_fp16_overflow_is_recomputed_in_bf16(small3):
    """fp16 has 5 exponent bits: a batch that overflows is redone in bf16, so no row carries inf/NaN."""
    m = load_e2style(small3, precision="fp16")
    x = images()
    assert torch.isfinite(m.invert(x).codes).all()
    with torch.no_grad():
        m.decoder.convs[0].activate.bias.fill_(1e6)  # far beyond fp16's 65504
    with pytest.warns(UserWarning, match="fp16 overflow"):
        out = m.invert(x)
    assert torch.isfinite(out.codes).all() and torch.isfinite(out.images).all()
    assert m.precision == "fp16"


def test_a_recorded_graph_serves_only_its_shape_stages_and_precision(small3):
    """invert replays a graph capture_invert recorded only for inputs of its shape, its stages, images and
    precision; anything else runs the networks. (The replay itself is checked on the GPU against the float32
    reference and, bit for bit, against the same compiled path unrecorded: benchmarks/check_gpu.py, its
    "-graph" rows.)"""
    m = load_e2style(small3)
    x = images()
    ref = m.invert(x, stages=2)
    calls = []

    def replay(inp):
        calls.append(inp.shape)
        return m._invert(inp, 2, True)

    m._graphs[m._graph_key(x.shape, 2, True)] = replay
    out = m.invert(x, stages=2)
    assert calls == [x.shape] and torch.equal(out.codes, ref.codes)
    m.invert(images(batch=3), stages=2)            # another batch size
    m.invert(x, stages=3)                          # other stages
    m.invert(x, stages=2, return_images=False)     # latents only
    m.set_precision("bf16")
    m.invert(x, stages=2)                          # another precision
    assert calls == [x.shape]
    m.optimize_for_gpu(channels_last=False, compile=False, kernels=True)  # networks changed: graphs dropped
    m.set_precision("fp32")
    m.invert(x, stages=2)
    assert calls == [x.shape]


def test_graph_capture_needs_a_cuda_model(small3):
    with pytest.raises(ValueError, match="CUDA model"):
        load_e2style(small3).capture_invert(2)
