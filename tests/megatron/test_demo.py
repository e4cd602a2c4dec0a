"""The main job: `python -m megatron_moetion.demo` trains, injects a fault, recovers, and writes a
summary whose verdict comes from the bitwise oracle."""

import json
import subprocess
import sys

import pytest

from megatron_moetion.demo.runner import REPO_ROOT

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(660)]


def test_demo_end_to_end(tmp_path, patched_megatron):
    out = subprocess.run([sys.executable, "-m", "megatron_moetion.demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "bitwise comparison with the fault-free run: IDENTICAL" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["megatron_version"] == "0.19.2"
    assert summary["parallel"] == {"tp": 1, "pp": 2, "ep": 2, "dp": 2}
    assert summary["iterations"] == 12 and len(summary["losses"]) == 12
    assert summary["bitwise_identical_to_fault_free"] is True
    oracle = summary["oracle"]  # what the verdict rests on: every rank's records and states
    assert oracle["identical"] is True and oracle["differences"] == 0
    assert oracle["ranks"] == 4 and oracle["iteration_records"] == 4 * 12
    assert oracle["state_snapshots"] == 4 * 4  # after iterations 4, 8, 12, and the final one
    assert oracle["tensors"] > 1000 and oracle["elements"] > 0 and oracle["scalar_fields"] > 100
    assert summary["comparison"].startswith("bitwise identical: 4 ranks, 48 iteration records, "
                                            "16 state snapshots, ")
    snap = summary["snapshot"]
    assert snap["window"] == 3 and snap["bytes_per_iter_mean"] < snap["dense_bytes_per_iter"]
    assert snap["replication_factor"] == 2 and snap["host_bytes_held"] > 0
    (rec,) = summary["recovery"]
    assert rec["ranks_replaying"] == [0, 1] and rec["ranks_paused"] == [2, 3]
    assert rec["replayed_iterations"] >= 1 and rec["seconds"] > 0
    assert summary["faults"] == ["rank=1,iter=9,phase=bwd,kind=lose_state"]
