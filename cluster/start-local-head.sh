#!/usr/bin/env bash
# Start a single-node Ray cluster on this machine for `ray job submit`, with the dashboard and job
# API on 127.0.0.1. Ray 2.60 replaces a node address of 127.0.0.1 with the host's routable
# address, and its gRPC servers listen on all interfaces, so firewall the Ray ports on shared hosts.
# Usage: cluster/start-local-head.sh [NUM_CPUS]     Stop it with: .venv/bin/ray stop
set -euo pipefail
cd "$(dirname "$0")/.."
num_cpus="${1:-$(nproc)}"
.venv/bin/ray start --head \
  --node-ip-address 127.0.0.1 \
  --dashboard-host 127.0.0.1 \
  --num-cpus "$num_cpus"
echo "Submit jobs with: .venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/demo.py --config configs/baby.yaml"
