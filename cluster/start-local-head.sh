#!/usr/bin/env bash
# Start a single-node Ray cluster on this machine for `ray job submit`, with the dashboard and job
# API on 127.0.0.1. Ray 2.60 replaces a node address of 127.0.0.1 with the host's routable
# address, and its gRPC servers listen on all interfaces, so firewall the Ray ports on shared hosts.
# Usage: cluster/start-local-head.sh [NUM_CPUS [RAY_START_OPTIONS ...]]
#   e.g. cluster/start-local-head.sh 4 --temp-dir /tmp/ray-cervi     Stop it with: .venv/bin/ray stop
set -euo pipefail
cd "$(dirname "$0")/.."
num_cpus="${1:-$(nproc)}"
shift || true
# Job entrypoints run `python` from the PATH of the node, so this checkout's .venv comes first.
export PATH="$PWD/.venv/bin:$PATH"
# Jobs run in a copy of the working directory, where the default ../shared/data does not exist,
# so the node passes an absolute data folder to every job.
export CERVI_RAY_DATA="${CERVI_RAY_DATA:-$(cd .. && pwd)/shared/data}"
echo "jobs will read data from CERVI_RAY_DATA=$CERVI_RAY_DATA"
ray start --head \
  --node-ip-address 127.0.0.1 \
  --dashboard-host 127.0.0.1 \
  --num-cpus "$num_cpus" \
  "$@"
echo "Submit jobs with: .venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\"
echo "    python jobs/demo.py --config configs/baby.yaml --set run.output_dir=$PWD/runs"
