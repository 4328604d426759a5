#!/usr/bin/env bash
# Submit the batch pipeline to a running Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://head-node:8265 examples/submit_cluster.sh [--no-wait] [--submission-id ID] \
#       [--config FILE] [--set key=value ...]
#
# --no-wait and --submission-id go to `ray job submit`; everything else goes to run_pipeline.py, after
# `--config configs/cluster.yaml` (a later --config replaces it). Without --no-wait the script follows the
# job's logs and exits non-zero when the job does not succeed.
#
# The working directory (this repo, without .venv, .git, out/ and tests/data) is uploaded and shipped to
# every node; inside the job, configs/cluster.yaml's ray.address "auto" joins the cluster the job runs on.
# Nodes need the project's dependencies (the cluster image, or a runtime_env "pip" list) and S3 credentials
# from their own AWS chain (instance role or environment): none travel in the config. Local paths in
# input.url / output.url / model.checkpoint must be absolute and visible to every node.
#
# Follow a job:   ray job logs --address "$RAY_ADDRESS" --follow ID      (status: ray job status ... ID)
# Stop a job:     ray job stop --address "$RAY_ADDRESS" ID
# Resubmit:       run this script again with the same config and output.url: committed shards are
#                 skipped, files of uncommitted ones are removed and those shards are redone.
set -euo pipefail
cd "$(dirname "$0")/.."
# (No apostrophes inside this message: bash parses quotes within ${...:?...}.)
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://head-node:8265}"

submit_opts=()
pipeline_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) submit_opts+=("--no-wait"); shift ;;
    --submission-id) submit_opts+=("--submission-id" "${2:?--submission-id needs a value}"); shift 2 ;;
    --submission-id=*) submit_opts+=("--submission-id" "${1#*=}"); shift ;;
    *) pipeline_args+=("$1"); shift ;;
  esac
done

exec ray job submit \
  --address "$RAY_ADDRESS" \
  ${submit_opts[@]+"${submit_opts[@]}"} \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "out", ".git", "tests/data"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}' \
  -- python run_pipeline.py --config configs/cluster.yaml ${pipeline_args[@]+"${pipeline_args[@]}"}
