#!/usr/bin/env bash
# Submit the batch pipeline to a running Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://head-node:8265 examples/submit_cluster.sh [--no-wait] [--submission-id ID] \
#       [--config FILE] [--set key=value ...]
#
# --no-wait and --submission-id go to `ray job submit` (default id: e2style-<UTC time>-<pid>); everything
# else goes to run_pipeline.py, after `--config configs/cluster.yaml` (a later --config replaces it).
# Without --no-wait the script follows the job's logs and exits 0 only when the job succeeded.
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
# Overlap:        one run writes an output.url at a time (its lease, output.url/_lease.json). A job started
#                 while another still writes there fails at once (exit 2 in its log, which names the
#                 running job's run id, host, start and last heartbeat) and touches nothing; add
#                 --set output.lease_wait_s=SECONDS to wait for the running one instead. A stopped or
#                 killed job's lease is released on SIGTERM, or taken over by the next job.
# On a schedule (cron; a workflow engine's task runs the same line):
#   0 * * * *  cd /srv/e2style && RAY_ADDRESS=http://head-node:8265 examples/submit_cluster.sh \
#              --set input.url=s3://bucket/photos --set output.url=s3://bucket/latents >> /var/log/e2style.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
# (No apostrophes inside this message: bash parses quotes within ${...:?...}.)
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://head-node:8265}"

submission_id=""
no_wait=0
pipeline_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) no_wait=1; shift ;;
    --submission-id) submission_id="${2:?--submission-id needs a value}"; shift 2 ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    *) pipeline_args+=("$1"); shift ;;
  esac
done
# An id of our own when none is given: the final status is looked up by it.
submission_id="${submission_id:-e2style-$(date -u +%Y%m%d-%H%M%S)-$$}"
submit_opts=(--submission-id "$submission_id")
[ "$no_wait" = 1 ] && submit_opts+=(--no-wait)

ray job submit \
  --address "$RAY_ADDRESS" \
  "${submit_opts[@]}" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "out", ".git", "tests/data"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}' \
  -- python run_pipeline.py --config configs/cluster.yaml ${pipeline_args[@]+"${pipeline_args[@]}"}

[ "$no_wait" = 1 ] && exit 0
# ray job submit exits 0 for a stopped job too: succeed only when the job did.
status_out="$(ray job status --address "$RAY_ADDRESS" "$submission_id" 2>&1 || true)"
if grep -q "Job '$submission_id' succeeded" <<<"$status_out"; then
  exit 0
fi
echo "job $submission_id did not succeed: ray job status --address $RAY_ADDRESS $submission_id" >&2
exit 1
