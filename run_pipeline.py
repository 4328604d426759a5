#!/usr/bin/env python
"""Invert a face-image dataset into E2Style / StyleGAN2 W+ latents, on Ray, exactly once per shard.

    python run_pipeline.py --config configs/demo.yaml [--set key=value ...] [--dry-run]
    python run_pipeline.py train --config configs/train_synthetic.yaml [--set key=value ...]
    python run_pipeline.py {decode,edit,mix,interpolate} --latents OUT --output OUT2 ...   (docs/editing_and_tasks.md)

Exit codes: 0 every shard committed; 1 some shard failed (listed in the log and in _run.json);
2 invalid config, an output that holds a run with another checkpoint/config (see output.overwrite), or an
output another live run is writing (its lease; see output.lease_wait_s).

Reading the outputs (here the demo's, out/demo; any checkpoint: the codes' shape is in the schema metadata):

    import json, numpy as np, pandas as pd, pyarrow.parquet as pq
    df = pd.read_parquet("out/demo/latents")            # s3://...: storage_options={"client_kwargs": {...}}
    shape = json.loads(pq.read_schema("out/demo/latents/demo-000000.parquet").metadata[b"codes_shape"])
    ok = df[df.status == "ok"]
    codes = np.stack(ok.codes.to_numpy()).reshape(len(ok), *shape)   # (N, n_latent, style_dim) W+
    print(codes.shape)   # the demo model: (16, 10, 32); official FFHQ models: (N, 18, 512)
    # reconstructions: out/demo/images/<shard>.tar, members <key>.recon.<output.image_format> (.png in the demo)

An official checkpoint instead of the demo model (a 3-stage E2Style trained for the small demo generator):
    --set model.checkpoint=/path/to/e2style_ffhq_inversion.pt   (or s3://bucket/e2style.pt)

Configuration reference: docs/CONFIG.md, or --help-config.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

# Ray reads these when it starts; set before importing anything that may start it.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The project's top-level packages (the layout is fixed): a folder or module of one of these names found first
# on sys.path (PYTHONPATH, the working folder of `python -m ...`) would be imported instead of ours.
OWN_PACKAGES = ("pipeline", "models", "workers")


def shadowed_package() -> str | None:
    """A message naming the first of OWN_PACKAGES that resolves to another folder than this project's, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in OWN_PACKAGES:
        spec = importlib.util.find_spec(name)
        found = os.path.dirname(spec.origin) if spec is not None and spec.origin else "(a namespace package)"
        if found != os.path.join(here, name):
            return (f"error: the package {name!r} resolves to {found}, not this project's {os.path.join(here, name)}: "
                    f"a folder or module of that name on PYTHONPATH or in the working folder shadows it; run the "
                    f"e2style command (it does not look in the working folder) or rename yours")
    return None


if (_shadowed := shadowed_package()) is not None:
    print(_shadowed, file=sys.stderr)
    sys.exit(2)


from pipeline.cli import cli_exit_code, setup_logging  # noqa: E402 - after the environment above
from pipeline.config import load_config  # noqa: E402
from pipeline.config_reference import render_config_reference  # noqa: E402
from pipeline.runner import run  # noqa: E402

# name -> "module" (its main(argv)) or "module:function"
SUBCOMMANDS = {"train": "pipeline.training.cli",
               "decode": "pipeline.latents:decode_main", "edit": "pipeline.latents:edit_main",
               "mix": "pipeline.latents:mix_main", "interpolate": "pipeline.latents:interpolate_main"}
SUBCOMMAND_HELP = {"train": "train an E2Style model (configs/train_*.yaml; README, \"Training\")",
                   "decode": "an inversion run's latents -> images, no re-inversion",
                   "edit": "latents moved along directions (.npy) -> edited images",
                   "mix": "style mixing: W+ layers taken from a reference row",
                   "interpolate": "images between pairs of rows"}
EPILOG = ("subcommands (each with its own --help):\n"
          + "".join(f"  {name:<12} {SUBCOMMAND_HELP[name]}\n" for name in SUBCOMMANDS)
          + "\nconfiguration: every key with its type, default and meaning in docs/CONFIG.md, or --help-config;\n"
            "examples: README.md. Exit codes: 0 every shard committed, 1 some shard failed (listed), 2 the run was\n"
            "refused before it started (config, checkpoint, storage, output, another run writing there); a refused run\n"
            "writes nothing.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        # `run_pipeline.py train --config configs/train_x.yaml`: the sibling jobs share this entry point.
        import importlib

        module, _, func = SUBCOMMANDS[argv[0]].partition(":")
        return getattr(importlib.import_module(module), func or "main")(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                 usage="%(prog)s [--config FILE] [--set KEY=VALUE ...] [--dry-run] | %(prog)s "
                                       "{" + ",".join(SUBCOMMANDS) + "} ...",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML config file (configs/*.yaml)")
    ap.add_argument("--help-config", action="store_true", help="print every config key (docs/CONFIG.md) and exit")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (model.batch_size=8); repeatable")
    ap.add_argument("--dry-run", action="store_true", help="plan and print the shards, then exit")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.help_config:
        sys.stdout.write(render_config_reference())
        return 0
    setup_logging(args.log_level)
    return cli_exit_code(lambda: run(load_config(args.config, args.overrides), dry_run=args.dry_run).exit_code)


if __name__ == "__main__":
    sys.exit(main())
