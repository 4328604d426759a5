#!/usr/bin/env bash
# Submit the batch pipeline to a running Ray cluster with GPU nodes.
#
#   RAY_ADDRESS=http://head-node:8265 examples/submit_cluster.sh [--set key=value ...]
#
# The working directory (this repo) is shipped to every node; inside the job, configs/cluster.yaml's
# ray.address "auto" joins the cluster the job runs on. Nodes need the project's dependencies (the
# cluster image, or a runtime_env "pip" list) and S3 credentials from their own AWS chain (instance
# role or environment): none travel in the config.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard address, e.g. http://head-node:8265}"

ray job submit \
  --address "$RAY_ADDRESS" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "out", ".git", "tests/data"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}' \
  -- python run_pipeline.py --config configs/cluster.yaml "$@"

# Follow it:      ray job logs --address "$RAY_ADDRESS" --follow <submission id>
# Rerun after a failure or with a grown input: submit again with the same config and output.url;
# committed shards are skipped, the rest are redone.
