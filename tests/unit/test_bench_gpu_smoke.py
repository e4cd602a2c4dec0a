"""``scripts/bench_gpu.sh``'s measurement code runs end to end at a tiny size on the CPU (its
numbers mean nothing there; the GPU run is what reports them)."""

import json
import subprocess
import sys

from megatron_moetion.demo.runner import REPO_ROOT


def test_gpu_bench_code_paths_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_moetion.bench.gpu", "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=100,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["bandwidth"]
    loops = {loop["mode"]: loop for loop in result["loops"]}
    assert set(loops) == {"none", "dense", "sparse", "dense_sync"}
    assert loops["sparse"]["bytes_per_iter"] < loops["dense"]["bytes_per_iter"]
    for mode in ("dense", "sparse", "dense_sync"):
        assert {"stall_ms", "overlap_share", "copy_ms_at_peak_bandwidth"} <= set(loops[mode])


def test_gpu_bench_without_a_gpu_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_moetion.bench.gpu", "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=100,
                          cwd=REPO_ROOT)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
