#!/usr/bin/env bash
# MoEtion inside Megatron's training loop on one GPU (about 6 minutes, no network): overhead of
# MoEtion off / W from Algorithm 1 / dense W=1 snapshots, slot exactness, in-memory recovery
# (bench/gpu_check.py says what each step measures). Writes OUT_DIR/gpu_check.json and
# OUT_DIR/gpu_check.log.
#
#   scripts/gpu_check.sh [OUT_DIR] [--cpu-smoke] [gpu_check flags...]  (default runs/gpu_check)
#
# What the machine lacks travels as wheels in .whl/ (scripts/gpu_wheels.sh fills it; on a
# machine with megatron-core installed they are not used): they are installed into a scratch
# folder first. The patched Megatron tree is built from the installed megatron-core wheel.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/runs/gpu_check
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
python=${PYTHON:-python3}
mkdir -p "$out"
log=$out/gpu_check.log
: > "$log"
has_mcore() {
  "$python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("megatron.core") is None)' \
    2> /dev/null
}
if ! has_mcore && compgen -G "$here/.whl/*.whl" > /dev/null; then
  site=${MOETION_WHEEL_SITE:-/tmp/moetion-site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$here"/.whl/*.whl >> "$log" 2>&1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv >> "$log" 2>&1 || true
tree=${MOETION_PATCHED_MEGATRON:-$here/build/megatron-patched}
PYTHON=$python bash "$here/scripts/check_patches.sh" "$tree" >> "$log" 2>&1 \
  || { tail -n 30 "$log"; exit 1; }
export MOETION_PATCHED_MEGATRON=$tree PYTHONUNBUFFERED=1
timeout 390 "$python" -m megatron_moetion.bench.gpu_check --out "$out" "$@"
