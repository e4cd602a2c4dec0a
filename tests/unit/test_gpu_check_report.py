"""The GPU check's parsing and reporting (``bench.gpu_check``), without running anything."""

from megatron_moetion.bench.gpu_check import iteration_times, main, table

LOG = """ [2026-12-02 04:00:00.1] iteration        1/      25 | consumed samples:            8 | elapsed time per iteration (ms): 912.3 | learning rate: 1.0E-04 |
 [2026-12-02 04:00:00.4] iteration        2/      25 | consumed samples:           16 | elapsed time per iteration (ms): 301.0 | throughput per GPU (TFLOP/s/GPU): 99.0 |
"""


def test_iteration_times_are_read_from_megatrons_log():
    assert iteration_times(LOG) == {1: 912.3, 2: 301.0}


def test_table_shows_each_way_against_off():
    ways = {"off": {"iteration_ms": 300.0},
            "algorithm1": {"iteration_ms": 303.0, "overhead_pct": 1.0, "window": 2,
                           "snapshot_bytes_per_iter": 9e9, "copy_gbps": 45.0,
                           "copy_share_of_peak": 0.9},
            "dense": {"iteration_ms": 600.0, "overhead_pct": 100.0, "window": 1,
                      "snapshot_bytes_per_iter": 16e9, "copy_gbps": 50.0,
                      "copy_share_of_peak": 1.0}}
    text = table({"steps": {"ways": ways}})
    assert "| MoEtion, W from Algorithm 1 | 2 | 303.0 | +1.00% | 9.00 | 45.0 (90%) |" in text
    assert "| dense in-memory snapshots (W = 1) | 1 | 600.0 | +100.00% |" in text


def test_unknown_step_is_named(capsys, tmp_path):
    try:
        main(["--out", str(tmp_path), "--cpu-smoke", "--steps", "ways,speed"])
    except SystemExit as e:
        assert e.code == 2
    assert "--steps: unknown ['speed']" in capsys.readouterr().err


def test_without_a_gpu_it_says_so(capsys, tmp_path):
    assert main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
