"""The benchmark runs at a tiny size and writes well-formed outputs (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from megatron_moetion.demo.runner import REPO_ROOT

# six short Megatron runs of 4 processes each (about 2 minutes on 2 cores)
pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.timeout(600)]


def test_bench_tiny_outputs_are_well_formed(tmp_path, patched_megatron):
    out = subprocess.run([sys.executable, "-m", "megatron_moetion.bench", "--tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=540,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    per_iter = result["per_iteration"]
    assert set(per_iter) == {"none", "checkfreq", "moetion", "dense", "moc"}
    for scheme, v in per_iter.items():
        assert v["iter_ms"] > 0 and v["stall_ms"] is not None, scheme
        assert {"bytes", "host_bytes", "stall_share", "iter_vs_none", "stall_vs_dense",
                "bytes_vs_dense"} <= set(v)
    assert per_iter["dense"]["bytes_vs_dense"] == 1.0
    assert per_iter["checkfreq"]["interval_iters"] >= 1
    rec = result["recovery"]["moetion"]
    assert rec["bitwise_identical"] is True and rec["rank_iterations_replayed"] > 0
    assert rec["global_rollback_to_window_rank_iterations"] >= rec["rank_iterations_replayed"]
    assert len(result["ettr_paper_setting"]) == 16  # 4 schemes x 4 MTBFs
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("| scheme | iteration (ms)") and "| moetion |" in table
    assert "DeepSeek-MoE-16.4B/64E: W=4, binding constraint network" in table
    assert "binding constraint" in out.stdout
    for png in ("ettr_vs_mtbf.png", "stall_per_iteration.png", "recovery_phases.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
