"""E2Style training (pipeline/training/, models/losses.py and its networks, models/optim.py, workers/train_worker.py)
on CPU.

Most tests use a tiny 32 px generator and let the encoders see its native 32 px images (``native_pool``:
the 256 px face pool is switched off) so a few steps cost well under a second; the Ray Train and CLI
tests run the real 256 px path for one step.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers.inputs import nested_overrides
from helpers.paths import REPO_ROOT
from models.checkpoint import load_e2style, read_checkpoint
from models.factory import atomic_save, generator_checkpoint
from models.stylegan2 import Generator, default_channels
from pipeline.training.config import resolve_config

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    torch.manual_seed(0)
    G = Generator(32, 16, 2, channels=default_channels(2, 16))
    path = str(tmp_path_factory.mktemp("gen") / "g32.pt")
    atomic_save(generator_checkpoint(G), path)
    return path


@pytest.fixture
def native_pool(monkeypatch):
    """Encoders see the generator's 32 px output instead of its 256 px upsampling (same code path, 64x cheaper)."""
    import models.e2style
    import pipeline.training.data
    import pipeline.training.model

    for module in (models.e2style, pipeline.training.data, pipeline.training.model):  # every module that calls it
        monkeypatch.setattr(module, "face_pool", lambda x: x)


def make_cfg(out, generator, **over):
    base = {
        "output_dir": str(out), "generator": generator,
        "loss": {"lpips": 0.0, "id": 0.0, "parse": 0.0, "latent": 1.0},
        "model": {"encoder_base_width": 16},
        "optim": {"name": "ranger", "lr": 1e-3},
        "train": {"stages": [1], "steps": 4, "batch_size": 4, "log_every": 1, "val_every": 1000, "save_every": 2},
        "data": {"val_count": 8, "val_batch_size": 8},
        "progress": False,
    }
    return resolve_config(base, nested_overrides(over))


def quiet(msg):
    pass


# ------------------------------------------------------------------------------------------------
# Losses and pretrained networks


@pytest.fixture(scope="module")
def random_pretrained(tmp_path_factory):
    """Randomly initialised stand-ins for the pretrained nets, saved in the real files' key layouts."""
    from models.arcface import Backbone
    from models.face_parsing import ParsingUNet
    from models.lpips import LPIPS

    d = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    lp = LPIPS().state_dict()
    paths = {
        "alexnet": str(d / "alexnet.pth"), "lpips_lin": str(d / "alex_lin.pth"),
        "ir_se50": str(d / "model_ir_se50.pth"), "parsing": str(d / "parsing.pth"),
    }
    # torchvision's file also holds classifier.*, which is ignored.
    torch.save({**{k: v for k, v in lp.items() if k.startswith("features.")}, "classifier.1.weight": torch.zeros(2, 2)}, paths["alexnet"])
    torch.save({k: v for k, v in lp.items() if k.startswith("lin")}, paths["lpips_lin"])
    torch.save(Backbone(50, (16, 32, 64, 128), embed_dim=32).state_dict(), paths["ir_se50"])
    torch.save(ParsingUNet(feature_scale=16).state_dict(), paths["parsing"])
    return paths


def test_pretrained_key_layouts_and_losses(random_pretrained):
    from models.arcface import load_ir_se50
    from models.face_parsing import load_parsing_unet
    from models.losses import E2StyleLoss
    from models.lpips import LPIPS, load_lpips

    keys = set(LPIPS().state_dict())
    assert {f"features.{i}.weight" for i in (0, 3, 6, 8, 10)} <= keys
    assert {f"lin{i}.model.1.weight" for i in range(5)} <= keys
    assert all(k.startswith(("features.", "lin")) for k in keys)
    net = load_ir_se50(random_pretrained["ir_se50"])
    assert net.stage_ends == (3, 7, 21, 24)
    feats = net(torch.randn(2, 3, 112, 112))
    assert len(feats) == 5 and feats[-1].shape == (2, 32)
    unet = load_parsing_unet(random_pretrained["parsing"])
    assert unet.segment(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)
    load_lpips(random_pretrained["alexnet"], random_pretrained["lpips_lin"])

    loss = E2StyleLoss({}, random_pretrained)  # the official weights
    assert loss.weights == {"l2": 1.0, "lpips": 0.8, "id": 0.5, "parse": 1.0, "w_norm": 0.0, "latent": 0.0}
    y = torch.rand(2, 3, 256, 256) * 2 - 1
    same, parts = loss(y, y)
    assert set(parts) == {"l2", "lpips", "id", "parse"}
    assert abs(float(same)) < 1e-4
    y_hat = (y + 0.2 * torch.randn_like(y)).requires_grad_()
    total, _ = loss(y_hat, y)
    total.backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # pretrained nets stay frozen


def test_missing_pretrained_file_fails_before_any_step(tmp_path, tiny_generator, random_pretrained):
    from models.losses import MissingPretrainedError
    from pipeline.training.cli import main
    from pipeline.training.loop import run_training

    cfg = make_cfg(tmp_path / "run", tiny_generator, loss__id=0.5, pretrained__ir_se50=str(tmp_path / "nope_ir_se50.pth"))
    with pytest.raises(MissingPretrainedError, match=r"pretrained\.ir_se50.*nope_ir_se50\.pth"):
        run_training(cfg, log=quiet)
    assert not (tmp_path / "run" / "stage1").exists()
    cfg = make_cfg(tmp_path / "run", tiny_generator, loss__parse=1.0)  # weighted, not configured
    with pytest.raises(MissingPretrainedError, match=r"loss\.parse.*pretrained\.parsing"):
        run_training(cfg, log=quiet)
    cfg = make_cfg(tmp_path / "run", str(tmp_path / "no_generator.pt"))
    with pytest.raises(FileNotFoundError, match="no_generator.pt"):
        run_training(cfg, log=quiet)
    # The CLI says so and exits 2.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"output_dir: {tmp_path / 'run2'}\ngenerator: {tiny_generator}\n"
                        f"pretrained: {{alexnet: {tmp_path / 'missing_alex.pth'}}}\n")
    assert main(["--config", str(cfg_file)]) == 2
    assert not (tmp_path / "run2" / "stage1").exists()


def test_files_of_the_wrong_kind_are_refused_before_anything_is_written(tmp_path, tiny_generator, capsys):
    from models.factory import write_checkpoint
    from pipeline.training.cli import main

    one_stage = write_checkpoint(tmp_path / "one_stage.pt", resolution=32, stages=1, width=16)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"output_dir: {tmp_path / 'run'}\ngenerator: {tiny_generator}\nloss: {{lpips: 0, id: 0, parse: 0}}\n")
    for overrides, message in [
        ([f"generator={one_stage}"], f"generator: {one_stage}: an E2Style checkpoint, not a StyleGAN2 generator"),
        ([f"model.init_checkpoint={tiny_generator}", "train.stages=2"],
         f"model.init_checkpoint: {tiny_generator}: a StyleGAN2 generator checkpoint"),
        ([f"model.init_checkpoint={one_stage}", "train.stages=3"],
         f"model.init_checkpoint: {one_stage} has 1 stage(s); training stage 3 needs 2"),
    ]:
        assert main(["--config", str(cfg_file), *(a for o in overrides for a in ("--set", o))]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Training behaviour


def test_few_steps_lower_the_loss(tmp_path, tiny_generator, native_pool):
    from pipeline.training.data import seeded_generator, synthetic_batch
    from pipeline.training.loop import run_training
    from pipeline.training.model import build_stage_model, validate_model

    cfg = make_cfg(tmp_path / "run", tiny_generator, train__steps=24, train__batch_size=4)
    model0, _ = build_stage_model(cfg, 1, quiet)
    x, w = synthetic_batch(model0.decoder, model0.latent_avg[0], 16, seeded_generator("heldout"))
    before = validate_model(model0, x, 1, 16, "cpu", None, w)
    [res] = run_training(cfg, log=quiet)
    after = validate_model(load_e2style(res["final"]), x, 1, 16, "cpu", None, w)
    assert res["step"] == 24
    assert after["stage1/mse"] < 0.9 * before["stage1/mse"], (before, after)
    assert after["stage1/latent_mse"] < before["stage1/latent_mse"]


def test_stage2_leaves_stage1_bit_identical(tmp_path, tiny_generator, native_pool):
    from pipeline.training.loop import run_training

    cfg = make_cfg(tmp_path / "run", tiny_generator, train__stages=[1, 2], train__steps=2)
    r1, r2 = run_training(cfg, log=quiet)
    s1 = read_checkpoint(r1["final"])["state_dict"]
    s2 = read_checkpoint(r2["final"])["state_dict"]
    frozen = [k for k in s1 if k.startswith(("encoder_firststage.", "decoder."))]
    assert frozen and set(s1) <= set(s2)
    changed = [k for k in frozen if not torch.equal(s1[k], s2[k])]
    assert not changed, changed[:5]  # weights and BatchNorm statistics alike
    assert any(k.startswith("encoder_refinestage_list.0.") for k in s2)
    m = load_e2style(r2["final"])
    assert m.num_stages == 2 and read_checkpoint(r2["final"])["opts"]["training_stage"] == 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert not torch.equal(m.invert(x, stages=1).codes, m.invert(x, stages=2).codes)
    # Stage 2 again as a separate run, from the stage-1 file given as init_checkpoint.
    cfg2 = make_cfg(tmp_path / "run_b", tiny_generator, train__stages=[2], train__steps=1, model__init_checkpoint=r1["final"])
    [r] = run_training(cfg2, log=quiet)
    sb = read_checkpoint(r["final"])["state_dict"]
    assert all(torch.equal(s1[k], sb[k]) for k in frozen)


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


class ProcessDied(BaseException):
    """What the test's crash raises: a BaseException, so no ``except Exception`` in the loop can swallow it."""


def test_resume_after_crash_continues_same_step_and_optimizer_state(tmp_path, tiny_generator, native_pool, monkeypatch):
    import pipeline.training.loop as loop
    from pipeline.training.paths import stage_paths

    ref_cfg = make_cfg(tmp_path / "ref", tiny_generator, train__steps=4, train__save_every=2)
    [ref] = loop.run_training(ref_cfg, log=quiet)

    # The process 'dies' inside its third step, after the update: nothing after it runs or is saved.
    real_step, steps_taken = loop.train_step, []

    def dies_in_third_step(run, x, w):
        steps_taken.append(real_step(run, x, w))
        if len(steps_taken) == 3:
            raise ProcessDied("killed during step 3")
        return steps_taken[-1]

    cfg = make_cfg(tmp_path / "crashy", tiny_generator, train__steps=4, train__save_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", dies_in_third_step)
        with pytest.raises(ProcessDied):
            loop.run_training(cfg, log=quiet)
    latest = stage_paths(cfg, 1)["latest"]
    assert not os.path.exists(stage_paths(cfg, 1)["final"])
    saved = read_checkpoint(latest)["train_state"]
    assert saved["step"] == 2 and saved["optimizer"]["state"]
    assert not [f for f in os.listdir(os.path.dirname(latest)) if f.endswith(".tmp")]
    assert load_e2style(latest).num_stages == 1  # the resume point is an official-layout file too

    logs = []
    [res] = loop.run_training(cfg, log=logs.append)
    assert any("resuming" in m and "step 2" in m for m in logs)
    assert res["step"] == 4
    a, b = read_checkpoint(ref["final"]), read_checkpoint(res["final"])
    assert _tensors_equal(a["state_dict"], b["state_dict"])  # same batches, same updates, same result
    ta, tb = read_checkpoint(stage_paths(ref_cfg, 1)["latest"])["train_state"], read_checkpoint(latest)["train_state"]
    assert ta["step"] == tb["step"] == 4
    assert _tensors_equal(ta["optimizer"], tb["optimizer"])
    # A rerun of a finished stage trains nothing.
    [again] = loop.run_training(cfg, log=quiet)
    assert again.get("skipped")


def test_adamw_and_w_norm(tmp_path, tiny_generator, native_pool):
    from pipeline.training.loop import run_training

    cfg = make_cfg(tmp_path / "run", tiny_generator, optim__name="adamw", loss__w_norm=0.01, train__steps=2, train__log_every=1)
    [res] = run_training(cfg, log=quiet)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "stage1", "logs", "metrics.jsonl"))]
    assert any("train/w_norm" in r for r in rows)
    assert load_e2style(res["final"]).num_stages == 1


def test_metrics_are_tensorboard_readable(tmp_path, tiny_generator, native_pool):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.training.loop import run_training
    from pipeline.training.metrics import MetricsLogger

    def read_back(log_dir) -> dict[tuple[str, int], float]:
        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}

    logger = MetricsLogger(str(tmp_path / "unit"))
    logger.log(3, {"train/loss": 0.25, "val/psnr": 21.5})
    logger.log(7, {"train/loss": 0.125})
    logger.close()
    assert read_back(tmp_path / "unit") == {("train/loss", 3): 0.25, ("val/psnr", 3): 21.5, ("train/loss", 7): 0.125}
    MetricsLogger(str(tmp_path / "rank1"), enabled=False).log(1, {"train/loss": 1.0})  # ranks > 0 write nothing
    assert not (tmp_path / "rank1").exists()

    # A training run's event file holds exactly the scalars of its metrics.jsonl: same tags, steps, values.
    cfg = make_cfg(tmp_path / "run", tiny_generator, train__steps=2, train__val_every=1)
    run_training(cfg, log=quiet)
    logs = tmp_path / "run" / "stage1" / "logs"
    assert len([f for f in os.listdir(logs) if f.startswith("events.out.tfevents.")]) == 1
    rows = [json.loads(line) for line in open(logs / "metrics.jsonl")]
    expected = {(tag, row["step"]): v for row in rows for tag, v in row.items() if tag not in ("step", "time")}
    got = read_back(logs)
    assert got.keys() == expected.keys()
    assert all(got[key] == pytest.approx(expected[key], rel=1e-6) for key in expected)  # float32 in the event file
    assert {("train/loss", 1), ("train/l2", 2), ("val/stage1/psnr", 1), ("val/stage1/mse", 2)} <= set(got)


def test_image_folder_training(tmp_path, tiny_generator):
    import numpy as np
    from PIL import Image

    from models.checkpoint import load_stylegan2
    from pipeline.training.data import decode_to_tensor, image_batches, seeded_generator, synthetic_batch
    from pipeline.training.loop import run_training

    G = load_stylegan2(tiny_generator)
    x, _ = synthetic_batch(G, None, 7, seeded_generator("imgs"))
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, a in enumerate(x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(np.ascontiguousarray(a)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    cfg = make_cfg(tmp_path / "run", tiny_generator, data__mode="images", data__url=str(folder), data__val_count=2,
                   loss__latent=0.0, train__steps=1, train__batch_size=2)
    [res] = run_training(cfg, log=quiet)  # the real 256 px path: images are resized to the encoders' 256
    assert res["step"] == 1 and "stage1/psnr" in res["val"]
    # Images come at the model's input size; held-out files never reach training; an undecodable file
    # costs its batch one slot (batches are formed before decoding, so a resume can skip them undecoded).
    held = {str(folder / "img0.png"), str(folder / "img1.png")}
    held_x = [decode_to_tensor((folder / f"img{i}.png").read_bytes()) for i in (0, 1)]
    it = image_batches(cfg.data, 0, 1, 2, 0, held)
    sizes = []
    for _ in range(3):  # one epoch: 5 good files + 1 broken = 3 raw batches of 2
        b = next(it)
        assert b.shape[1:] == (3, 256, 256) and b.min() >= -1 and b.max() <= 1
        assert not any(torch.equal(img, h) for img in b for h in held_x)
        sizes.append(len(b))
    assert sorted(sizes) == [1, 2, 2]
    from pipeline.training.config import TrainConfigError, resolve_config
    with pytest.raises(TrainConfigError, match="loss.latent"):
        resolve_config({"output_dir": "x", "data": {"mode": "images", "url": str(folder)}, "loss": {"latent": 1.0}})


def test_demo_script_runs_tiny(tmp_path, native_pool):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo_model", os.path.join(REPO_ROOT, "benchmarks", "train_demo_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "demo"
    assert mod.main(["--out", str(out), "--resolution", "32", "--style-dim", "16", "--gen-width", "16", "--n-mlp", "2",
                     "--batch-size", "2", "--steps", "2", "--val-count", "4", "--shard-count", "3", "--time-budget", "600"]) == 0
    rep = json.loads((out / "psnr.json").read_text())
    assert set(rep["fp16_files"]) == {"stage1", "stage2", "stage3"}
    m = load_e2style(str(out / "e2style_demo.pt"))
    assert m.num_stages == 3 and m.decoder.style_dim == 16
    assert read_checkpoint(str(out / "e2style_demo.pt"))["state_dict"]["decoder.input.input"].dtype == torch.float16
    import tarfile
    with tarfile.open(out / "demo_input" / "demo-000000.tar") as tf:
        assert len([n for n in tf.getnames() if n.endswith(".png")]) == 3
    assert (out / "contact_sheet.png").exists()


# ------------------------------------------------------------------------------------------------
# Entry points (real 256 px path)


def test_cli_trains_from_yaml(tmp_path, tiny_generator):
    from pipeline.training.cli import main

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        f"output_dir: {tmp_path / 'run'}\ngenerator: {tiny_generator}\n"
        "loss: {lpips: 0, id: 0, parse: 0}\nmodel: {encoder_base_width: 16}\n"
        "train: {steps: 5, batch_size: 1}\ndata: {val_count: 2}\nprogress: false\n")
    assert main(["--config", str(cfg_file), "--set", "train.steps=1"]) == 0
    m = load_e2style(str(tmp_path / "run" / "stage1" / "e2style_stage1.pt"))
    assert m.num_stages == 1 and read_checkpoint(str(tmp_path / "run" / "stage1" / "e2style_stage1.pt"))["opts"]["step"] == 1


def test_shipped_configs_resolve():
    from pipeline.training.config import load_train_config

    root = os.path.join(REPO_ROOT, "configs")
    for name in ("train_synthetic.yaml", "train_demo.yaml"):
        cfg = load_train_config(os.path.join(root, name))
        assert cfg.data.mode in ("synthetic", "images")


def _spied_ddp_rank(rank: int, world_size: int, cfg, port: int) -> None:
    """``pipeline.training.ddp.ddp_rank_main`` with spies that keep what this rank trained on and the trainable
    encoder's weights before and after, in ``output_dir/rank{rank}.pt`` (spawned processes do not see the test's
    patches)."""
    import pipeline.training.loop as loop
    from pipeline.training.ddp import ddp_rank_main

    build_stage_model, training_batches = loop.build_stage_model, loop.training_batches
    seen = {"inputs": []}

    def spy_build(*args, **kwargs):
        model, enc = build_stage_model(*args, **kwargs)
        seen["encoder"] = enc
        seen["initial"] = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
        return model, enc

    def spy_batches(*args, **kwargs):
        for x, w in training_batches(*args, **kwargs):
            seen["inputs"].append(x.detach().clone())
            yield x, w

    loop.build_stage_model, loop.training_batches = spy_build, spy_batches
    ddp_rank_main(rank, world_size, cfg, port)
    final = {n: p.detach().clone() for n, p in seen["encoder"].named_parameters() if p.requires_grad}
    torch.save({"inputs": seen["inputs"], "initial": seen["initial"], "final": final}, os.path.join(cfg.output_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_ranks_in_step(tmp_path, tiny_generator, monkeypatch):
    """Two ranks train on different batches and must end with the same weights: only true when every step's
    gradients are averaged across ranks (DDP). Without DDP each rank would follow its own data."""
    import pipeline.training.ddp as launcher

    cfg = make_cfg(tmp_path / "run", tiny_generator, train__steps=2, train__batch_size=1, data__val_count=1,
                   train__device="cpu", train__num_threads=1, train__max_seconds=300)
    monkeypatch.setattr(launcher, "ddp_rank_main", _spied_ddp_rank)
    [res] = launcher.run_local_ddp(cfg, 2)
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["inputs"]) == len(r1["inputs"]) == 2
    assert not any(torch.equal(a, b) for a, b in zip(r0["inputs"], r1["inputs"]))
    assert r0["final"].keys() == r1["final"].keys() and r0["final"]
    assert all(torch.equal(r0["final"][n], r1["final"][n]) for n in r0["final"])
    assert any(not torch.equal(r0["final"][n], r0["initial"][n]) for n in r0["final"])  # they did train
    ck = read_checkpoint(res["final"])
    assert ck["opts"]["step"] == 2 and load_e2style(res["final"]).num_stages == 1
    assert all(torch.equal(ck["state_dict"][f"encoder_firststage.{n}"], v) for n, v in r0["final"].items())


@pytest.mark.ray
def test_ray_train_one_worker(tmp_path, tiny_generator, ray_session):
    from workers.train_worker import run_ray_training

    cfg = make_cfg(tmp_path / "run", tiny_generator, train__steps=1, train__batch_size=1, data__val_count=1,
                   num_workers=1, use_gpu=False)
    [res] = run_ray_training(cfg)
    m = load_e2style(res["final"])
    assert m.num_stages == 1
    assert read_checkpoint(res["final"])["opts"]["step"] == 1


# ------------------------------------------------------------------------------------------------
# The typed config


def test_config_is_typed_frozen_and_errors_name_the_key(tmp_path, tiny_generator, capsys):
    import dataclasses

    from pipeline.training.cli import main
    from pipeline.training.config import TrainConfig, TrainConfigError, load_train_config, resolve_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"output_dir: {tmp_path / 'run'}\ngenerator: {tiny_generator}\ntrain: {{stages: 2, steps: 7}}\n")
    cfg = load_train_config(str(cfg_file), ["train.batch_size=3", "loss.lpips=0", "data.truncation=0.7"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.train.stages, cfg.train.steps, cfg.train.batch_size) == ((2,), 7, 3)  # an int k means [k]
    assert (cfg.loss.lpips, cfg.loss.l2, cfg.data.truncation) == (0, 1.0, 0.7)  # untouched keys keep defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 8
    assert cfg.to_dict()["train"]["stages"] == [2]
    assert resolve_config(cfg.to_dict()) == cfg  # what train_config.json holds reads back to the same config

    for overrides, key, why in [
        (["train.stpes=3"], "train.stpes", "did you mean 'steps'"),
        (["train.steps=many"], "train.steps", "must be an integer"),
        (["train.stages=[1, 3]"], "train.stages", "consecutive"),
        (["optim.name=sgd"], "optim.name", "ranger, adamw or adam"),
        (["data.format=zip"], "data.format", "auto, images"),
        (["use_gpu=maybe"], "use_gpu", "true or false"),
        (["generator=3"], "generator", "a string"),
        (["output_dir="], "output_dir", "is required"),
    ]:
        with pytest.raises(TrainConfigError, match=f"invalid training config: {key}: .*{why}"):
            load_train_config(str(cfg_file), overrides)
        assert main(["--config", str(cfg_file), "--set", overrides[0]]) == 2  # the CLI refuses before writing
        assert f"error: invalid training config: {key}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# The README's training commands, as written (issue 29: they must run from a fresh clone)

README = os.path.join(REPO_ROOT, "README.md")
README_MARK = "<!-- readme-test: {} -->"


def readme_commands(kind: str) -> list[str]:
    """The commands in the README's code block after each ``<!-- readme-test: kind -->`` (indented or fenced;
    ``\\`` continues a line), exactly as a reader would paste them."""
    lines = open(README, encoding="utf-8").read().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != README_MARK.format(kind):
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fenced = lines[j].startswith("```")
        j += fenced
        block = []
        while j < len(lines) and (not lines[j].startswith("```") if fenced else lines[j].startswith("    ")):
            block.append(lines[j].strip())
            j += 1
        found += [cmd for cmd in "\n".join(block).replace("\\\n", " ").splitlines() if cmd.strip()]
    return found


def _as_written(command: str) -> list[str]:
    """argv of a README command: its own words, with the README's interpreter (.venv/bin/python) this one."""
    import shlex
    import sys

    argv = shlex.split(command, comments=True)
    assert argv[0] == ".venv/bin/python", f"a README command that does not start with .venv/bin/python: {command}"
    return [sys.executable, *argv[1:]]


@pytest.fixture
def fresh_clone(tmp_path):
    """A copy of the repository's tracked files (as they are in the working tree) and nothing else: no out/, no
    trained model. Copies, not links: run_pipeline.py refuses packages found outside its own folder."""
    import shutil
    import subprocess

    root = REPO_ROOT
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True).stdout
    clone = tmp_path / "clone"
    for rel in filter(None, tracked.split("\0")):
        if os.path.isfile(os.path.join(root, rel)):  # not one deleted in the working tree
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(root, rel), clone / rel)
    assert (clone / "run_pipeline.py").is_file() and not (clone / "out").exists()
    return clone


@pytest.mark.slow
def test_readme_training_commands_run_as_written(fresh_clone):
    import math
    import subprocess
    import time

    from pipeline.training.config import load_train_config
    from pipeline.training.paths import stage_paths

    [runs] = readme_commands("runs")
    [starts] = readme_commands("starts")
    assert " train --config configs/train_synthetic.yaml" in runs and " train --config " in starts

    done = subprocess.run(_as_written(runs), cwd=fresh_clone, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(done.stdout)
    final = fresh_clone / result["final"]
    assert load_e2style(str(final)).num_stages == result["stage"] == 1
    assert read_checkpoint(str(final))["opts"]["step"] == result["step"] == 10
    assert final.is_relative_to(fresh_clone / "out")  # written where the README says, inside the clone

    # The whole config starts as written: it builds its model and takes a step (then this test stops it).
    argv = _as_written(starts)
    cfg = load_train_config(str(fresh_clone / argv[argv.index("--config") + 1]))
    metrics = fresh_clone / stage_paths(cfg, cfg.train.stages[0])["logs"] / "metrics.jsonl"
    stderr = fresh_clone / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(argv, cwd=fresh_clone, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 900
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, f"exited {proc.returncode} before its first step: {stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step logged in 15 minutes"
            time.sleep(1)
    finally:
        proc.kill()
        proc.wait()
    first = json.loads(metrics.read_text().splitlines()[0])
    assert first["step"] == 1 and math.isfinite(first["train/loss"])
