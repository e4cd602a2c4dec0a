"""``scripts/gpu_check.sh`` end to end on the CPU with the tiny model (``--cpu-smoke``): the three
ways, the slot exactness check and the in-memory recovery all run through the same code the GPU
run uses, so the script cannot rot between GPU sessions (its timings mean nothing here)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_moetion.demo.runner import REPO_ROOT

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(600)]


def test_gpu_check_runs_every_step_on_cpu(tmp_path, patched_megatron):
    env = dict(os.environ, PYTHON=sys.executable, MOETION_PATCHED_MEGATRON=str(patched_megatron))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path), "--cpu-smoke",
                           "--budget-s", "500"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=580)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["errors"] == {} and (tmp_path / "gpu_check.log").stat().st_size > 0
    steps = result["steps"]
    assert steps["peak"]["copy_gbps"] > 0
    ways = steps["ways"]
    assert ways["parameters"] > 0 and ways["measured_iterations"] >= 4
    for name in ("off", "algorithm1", "dense"):
        assert ways[name]["iterations_timed"] == ways["measured_iterations"], ways[name]
    dense, alg1 = ways["dense"], ways["algorithm1"]
    assert dense["window"] == 1 and alg1["window"] >= 1 and alg1["window_binding"]
    assert dense["snapshot_bytes_per_iter"] >= alg1["snapshot_bytes_per_iter"] > 0
    assert dense["copy_gbps"] > 0 and "overhead_pct" in dense
    exact = steps["exactness"]
    assert exact["ok"] and exact["windows"] >= 2 and exact["items"] > 0, exact
    rec = steps["recovery"]
    assert rec["status"] == "identical" and rec["recoveries"] == 1, rec
    assert rec["negative_control"] == "different (caught)"
    assert "| MoEtion, W from Algorithm 1 |" in result["table"]
