#!/usr/bin/env bash
# Spark resource discovery script for GPUs: prints {"name": "gpu", "addresses": ["0", "1", ...]}.
# Spark runs it on each executor when spark.executor.resource.gpu.discoveryScript points here.
set -euo pipefail
addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | sed 's/ //g' | paste -sd, - || true)
echo "{\"name\": \"gpu\", \"addresses\": [$(sed 's/\([0-9]\+\)/"\1"/g' <<<"$addresses")]}"
