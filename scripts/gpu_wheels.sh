#!/usr/bin/env bash
# Fill .whl/ with what scripts/gpu_check.sh needs on a GPU machine without a registry that has
# Python 3.12 and torch with CUDA but no Megatron: the megatron-core wheel for that Python (its
# other needs, numpy and packaging, are there). Run where pip reaches a registry.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]      (default 3.12)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pyver=${1:-3.12}
mkdir -p "$here/.whl"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$here/.whl" megatron-core==0.19.2
ls -l "$here/.whl"
