#!/usr/bin/env bash
# One command that proves minideep's CUDA paths on a lent GPU (docs/gpu-check.md):
#   bash scripts/gpu-check.sh OUT          on one or two CUDA GPUs (8 minutes at most)
#   bash scripts/gpu-check.sh OUT --cpu    dry run on the CPU, tiny shapes (the default tests run it)
# Writes OUT/gpu-check.json and OUT/summary.txt; exit 0 passed, 1 a check failed, 2 no CUDA or no pytest.
# Installs nothing: it needs only what the README's install command gives (with the test extra).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python}" "$ROOT/scripts/gpu_check.py" "$@"
