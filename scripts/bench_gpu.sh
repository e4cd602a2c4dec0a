#!/usr/bin/env bash
# One prepared GPU benchmark (single GPU, under 8 minutes): pinned device-to-host bandwidth, and
# the snapshot stall per iteration with and without MoEtion on a model with ~10 GB of state.
#
#   scripts/bench_gpu.sh [OUT_JSON]        (default runs/bench_gpu.json)
#
# Needs only torch with CUDA (and this repository on PYTHONPATH); no Megatron, no data.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/runs/bench_gpu.json}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>/dev/null || true
timeout 480 "${PYTHON:-python}" -m megatron_moetion.bench.gpu --out "$out"
