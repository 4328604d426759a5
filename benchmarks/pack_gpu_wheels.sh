#!/usr/bin/env bash
# Packs what the GPU machine lacks for the pipeline benchmarks (Ray 2.60 and its schema packages, dlib-bin;
# Python 3.12) into .wheels312/ (git-ignored), small enough to travel beside the repository (64 MiB in all):
# Ray's wheel, trimmed as ../shared/tools/trim_ray_wheel.py does and without rllib/serve/llm, goes as one
# xz tar of the unpacked files (24.7 MB against 44 MB zipped). Needs a package registry.
#
#   benchmarks/pack_gpu_wheels.sh
# On the GPU machine (the device tool's run, with carry [".wheels312"]):
#   mkdir -p /tmp/site && tar xJf .wheels312/ray312.tar.xz -C /tmp/site
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels312/dlib_bin*.whl
#   export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '.wheels312/' .git/info/exclude 2>/dev/null || echo '.wheels312/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
get() { pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
get "$work/w" ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py
python ../shared/tools/trim_ray_wheel.py "$work"/w/ray-2.60.0-*.whl "$work/ray-trimmed.whl"
mkdir -p "$work/site" .wheels312
(cd "$work/site" && unzip -q "$work/ray-trimmed.whl" && for w in "$work"/w/{jsonschema,referencing,rpds_py}*.whl; do unzip -qo "$w"; done \
  && rm -rf ray/rllib ray/serve ray/llm)
tar cf - -C "$work/site" . | xz -9e -T0 > .wheels312/ray312.tar.xz
get .wheels312 dlib-bin
ls -la .wheels312
