"""Config loading, --set overrides, validation errors that name the key, redaction, and the CLI's exit codes."""
from __future__ import annotations

import json
import os

import pytest
import yaml

import run_pipeline
from helpers.inputs import tiny_image_bytes
from helpers.paths import REPO_ROOT
from pipeline.config import ConfigError, DEFAULTS, fingerprint, load_config, parse_overrides, redact, resolve

BASE = {"input": {"url": "/data/in"}, "output": {"url": "/data/out"}, "model": {"checkpoint": "/m.pt"}}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "directions":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", ["demo", "s3", "cluster"])
def test_shipped_configs_resolve(name):
    """Every key a shipped config names reaches the typed config with the file's value (none is misspelt into
    a default, none is dropped), and the local files the demo names exist."""
    path = os.path.join(REPO_ROOT, "configs", f"{name}.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    cfg = load_config(path)
    assert set(cfg.to_dict()) == set(DEFAULTS)
    for key, value in _leaves(raw):
        got = cfg.get(key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    if name == "demo":
        assert os.path.isfile(os.path.join(REPO_ROOT, cfg.model.checkpoint))
        assert os.listdir(os.path.join(REPO_ROOT, cfg.input.url))
    if name == "cluster":
        assert cfg.ray.address == "auto" and cfg.progress is False and cfg.progress_interval_s > 0


def test_config_is_typed_and_frozen():
    import dataclasses

    cfg = resolve(BASE, {"edit": {"alphas": [1, 2], "layers": [0, 4]}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.batch_size = 3
    assert cfg.edit.alphas == (1, 2) and cfg.edit.layers == (0, 4)
    assert cfg.to_dict()["edit"]["alphas"] == [1, 2]
    assert resolve(cfg.to_dict()) == cfg  # the plain mapping resolves to the same config


def test_set_overrides_dotted_keys_typed_values():
    ov = parse_overrides(["model.batch_size=8", "align.enabled=false", "storage.endpoint_url=http://h:9000",
                          "model.stages=null", "input.url=s3://b/p=q"])
    cfg = resolve(BASE, ov)
    assert cfg.model.batch_size == 8 and cfg.align.enabled is False
    assert cfg.storage.endpoint_url == "http://h:9000" and cfg.model.stages is None
    assert cfg.input.url == "s3://b/p=q"  # only the first '=' splits
    assert cfg.output.image_format == "jpg"  # defaults fill the rest


@pytest.mark.parametrize("over, key, words", [
    ({"model": {"batch_size": 0}}, "model.batch_size", ">= 1"),
    ({"model": {"batch_size": "8"}}, "model.batch_size", "integer"),
    ({"model": {"batch_size": "max"}}, "model.batch_size", "'auto' or an integer"),
    ({"model": {"batch_size": 5000}}, "model.batch_size", "<= 4096"),
    ({"model": {"batch_size": 256}}, "model.batch_size", "at most 128 unless model.device is cpu"),
    ({"model": {"batch_size": 129, "device": "cuda"}}, "model.batch_size", "largest batch checked on GPUs"),
    ({"model": {"precision": "fp8"}}, "model.precision", "one of"),
    ({"output": {"image_format": "gif"}}, "output.image_format", "one of"),
    ({"align": {"enabled": "yes"}}, "align.enabled", "true or false"),
    ({"align": {"policy": "center"}}, "align.policy", "largest"),
    ({"align": {"output_size": 512, "transform_size": 256}}, "align.transform_size", "output_size"),
    ({"align": {"detect_max_side": 100}}, "align.detect_max_side", ">= 160"),
    ({"align": {"max_upsample": -1}}, "align.max_upsample", ">= 0"),
    ({"align": {"min_face_size": 1.5}}, "align.min_face_size", "integer"),
    ({"input": {"format": "zip"}}, "input.format", "webdataset"),
    ({"input": {"url": None}}, "input.url", "required"),
    ({"model": {"checkpoint": ""}}, "model.checkpoint", "string"),
    ({"storage": {"endpoint_url": "127.0.0.1:9000"}}, "storage.endpoint_url", "http"),
    ({"modle": {"stages": 1}}, "modle", "did you mean 'model'"),
    ({"model": {"stage": 1}}, "model.stage", "did you mean 'stages'"),
    ({"output": {"url": "/data/in/sub"}}, "output.url", "input"),
    ({"shard_size": -1}, "shard_size", ">= 1"),
    ({"model": 3}, "model", "mapping"),
    ({"ray": {"actor_resources": {"inverter": -1}}}, "ray.actor_resources", ">= 0"),
    ({"ray": {"actor_resources": ["inverter"]}}, "ray.actor_resources", "mapping"),
    ({"progress_interval_s": -5}, "progress_interval_s", ">= 0"),
])
def test_invalid_config_names_key_and_reason(over, key, words):
    cfg = json.loads(json.dumps(BASE))
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    with pytest.raises(ConfigError) as ei:
        resolve(cfg)
    assert ei.value.key == key
    assert words in str(ei.value)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.batch_size"])
    with pytest.raises(ConfigError):
        parse_overrides(["=3"])


def test_redact_hides_secrets_and_url_credentials():
    r = redact({"storage": {"endpoint_url": "http://user:pw@h:9000", "aws_secret_access_key": "abc", "token": None},
                "model": {"checkpoint": "s3://b/m.pt"}})
    assert r["storage"]["aws_secret_access_key"] == "***"
    assert "pw" not in r["storage"]["endpoint_url"] and r["model"]["checkpoint"] == "s3://b/m.pt"


def test_fingerprint_ignores_speed_only_keys():
    a = resolve(BASE)
    b = resolve(BASE, {"model": {"batch_size": 3}, "ray": {"num_actors": 4}, "storage": {"endpoint_url": "http://x"}})
    c = resolve(BASE, {"output": {"image_size": 128}})
    assert fingerprint(a, "s")[0] == fingerprint(b, "s")[0]
    assert fingerprint(a, "s")[0] != fingerprint(c, "s")[0]
    assert fingerprint(a, "s")[0] != fingerprint(a, "t")[0]


def test_cli_invalid_config_exit_2(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert run_pipeline.main(["--config", str(p), "--set", "model.batch_size=-4"]) == 2
    err = capsys.readouterr().err
    assert "model.batch_size" in err and ">= 1" in err
    assert run_pipeline.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    # a checkpoint that does not exist is reported before any work starts
    assert run_pipeline.main(["--config", str(p), "--dry-run", "--set", f"model.checkpoint={tmp_path}/none.pt"]) == 2
    assert "model.checkpoint" in capsys.readouterr().err


def test_cli_dry_run_prints_plan(tmp_path, capsys, tiny_checkpoint):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    for i in range(5):
        (src / "a" / f"{i}.jpg").write_bytes(tiny_image_bytes(i))
    rc = run_pipeline.main(["--dry-run", "--set", f"input.url={src}", "--set", f"output.url={tmp_path}/out",
                            "--set", f"model.checkpoint={tiny_checkpoint}", "--set", "shard_size=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "format: images" in out and "shards: 3" in out and "todo  images-000002  (1 images)" in out
    assert not (tmp_path / "out").exists()


def test_batch_size_auto_is_the_default_and_resolves_per_device():
    from pipeline.checkpoints import resolve_batch_size

    cfg = resolve(json.loads(json.dumps(BASE)))
    assert cfg.model.batch_size == "auto"
    assert resolve_batch_size("auto", "cuda") == 64 and resolve_batch_size("auto", "cuda:1") == 64
    assert resolve_batch_size("auto", "cpu") == 16
    assert resolve_batch_size(8, "cuda") == 8  # an explicit size is kept on any device
    assert resolve_batch_size(128, "cuda") == 128 and resolve_batch_size(512, "cpu") == 512
    cpu_cfg = json.loads(json.dumps(BASE))
    cpu_cfg["model"].update({"batch_size": 512, "device": "cpu"})
    assert resolve(cpu_cfg).model.batch_size == 512  # CPU actors: no GPU cap
    with pytest.raises(ValueError, match="model.batch_size: at most 128 on a GPU"):
        resolve_batch_size(129, "cuda:0")  # beyond the batches checked on GPUs


# ----------------------------------------------------------------------------------------------------
# The configuration reference and the command line's help

def test_config_reference_is_in_sync_with_the_typed_config():
    """docs/CONFIG.md is what the generator makes of pipeline/config.py now: a key added, renamed, retyped or
    given another default without regenerating it fails here (regenerate with the command in its header)."""
    from pipeline.config_reference import CONFIG_DOC, render_config_reference

    with open(os.path.join(REPO_ROOT, CONFIG_DOC), encoding="utf-8") as f:
        assert f.read() == render_config_reference(), \
            f"{CONFIG_DOC} is stale: run .venv/bin/python -m pipeline.config_reference --write {CONFIG_DOC}"


def test_config_reference_has_every_key_with_type_default_and_meaning():
    from pipeline.config_reference import config_keys

    keys = {k.key: k for k in config_keys()}
    assert set(keys) == {k for k, _ in _leaves(DEFAULTS)}
    for k, v in _leaves(DEFAULTS):
        assert keys[k].default == v and keys[k].type and len(keys[k].meaning) > 10, keys[k]
    # the keys a new user could only find in _run.json before
    for k in ("input.max_pixels", "input.key_column", "model.device", "ray.num_cpus", "ray.max_shards_in_flight",
              "ray.chunk_size", "output.jpeg_quality"):
        assert keys[k].meaning, k


def test_field_meanings_beside_continued_or_above_and_none_is_an_error():
    from pipeline.config_reference import _field_meanings

    source = (
        "class A:\n"
        "    beside: int = 1        # one line\n"
        "    continued: int = 2     # first part,\n"
        "                           # second part\n"
        "    # the block above,\n"
        "    # two lines\n"
        "    above: int = 3\n"
        "    bare: int = 4\n"
        "    # a comment of the next field only\n"
        "    after: int = 5\n")
    assert _field_meanings(source)["A"] == {"beside": "one line", "continued": "first part, second part",
                                            "above": "the block above, two lines", "bare": "",
                                            "after": "a comment of the next field only"}


def test_help_lists_subcommands_and_points_to_the_config_reference(capsys):
    with pytest.raises(SystemExit) as e:
        run_pipeline.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "decode", "edit", "mix", "interpolate"):
        assert f"\n  {name} " in out, out
    assert "docs/CONFIG.md" in out and "--help-config" in out
    assert run_pipeline.main(["--help-config"]) == 0
    with open(os.path.join(REPO_ROOT, "docs", "CONFIG.md"), encoding="utf-8") as f:
        assert capsys.readouterr().out == f.read()


@pytest.mark.parametrize("op", ["decode", "edit", "mix", "interpolate"])
def test_latents_subcommand_help_says_what_it_does_in_whole_sentences(op, capsys):
    with pytest.raises(SystemExit) as e:
        run_pipeline.main([op, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith(".") and "no re-inversion" in description, description
    assert out.rstrip().endswith("--help-config."), out  # the epilog, whole
