"""Sparse snapshots on real Megatron-Core (PP=2 x EP=2 x DP=2): every operator captured once per
window, snapshots bit-identical to the live state, buddies byte-identical, corruption caught and
never persisted, host memory flat, bad flags refused."""


import pytest

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.testing.snapshot_check import check_run

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(300)]

LAYOUTS = {
    "distopt_fp32": RunConfig(),
    "plain_fp32": RunConfig(distributed_optimizer=False),
    "plain_bf16": RunConfig(distributed_optimizer=False, bf16=True),
    "distopt_bf16_expert_bias": RunConfig(bf16=True, extra_flags=(
        "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid")),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_snapshots_equal_the_live_state_bit_for_bit(layout, tmp_path, run_ok):
    cfg = LAYOUTS[layout].replace(train_iters=8, moetion=True, window=3,
                                  extra_flags=LAYOUTS[layout].extra_flags + (
                                      "--moetion-persist-dir", str(tmp_path / "persist")))
    run_ok(cfg.with_flags("--moetion-debug-dump-dir", tmp_path / "debug"), tmp_path)
    report = check_run(tmp_path / "persist", tmp_path / "debug")
    assert report.ok, report.problems[:10]
    assert report.windows == 4 and report.replicas == 8  # each rank's window 0, 2 buddies each
    metrics = read_metrics(tmp_path / "metrics")
    for records in metrics.values():
        by_iter = {r["iteration"]: r for r in records}
        assert [by_iter[i]["slot"] for i in range(2, 9)] == [0, 1, 2, 0, 1, 2, 0]
        dense = by_iter[2]["dense_bytes"]
        assert all(by_iter[i]["snapshot_bytes"] < dense for i in range(2, 9))
    if "bf16" in layout:  # mixed precision: frozen experts cost 2 bytes per parameter
        assert report.bytes > 0


def test_corrupt_copy_is_caught_and_never_persisted_and_memory_stays_flat(tmp_path, run_ok):
    cfg = RunConfig(train_iters=16, moetion=True, window=2,
                    fault_plan="rank=1,iter=6,phase=replication,kind=corrupt_replica",
                    extra_flags=("--moetion-persist-dir", str(tmp_path / "persist")))
    run_ok(cfg, tmp_path)
    metrics = read_metrics(tmp_path / "metrics")
    # windows are [2,3], [4,5], [6,7], ...: window 1 is shipped at the start of iteration 6,
    # and rank 1's first buddy (rank 2) got a corrupted copy of it and refused it
    assert metrics[2][-1]["corrupt_copies_detected"] == 1
    assert sum(m[-1]["corrupt_copies_detected"] for m in metrics.values()) == 1
    assert metrics[1][-1]["replication_failures"] == 1
    for records in metrics.values():
        persisted = [r["persisted_window"] for r in records if r["persisted_window"] is not None]
        assert 1 not in persisted and persisted[-1] >= 4, persisted
        assert 2 in persisted  # the next window persisted normally
    assert not list((tmp_path / "persist").glob("*.window1.moetion"))
    assert (tmp_path / "persist" / "rank1.window2.moetion").exists()
    for rank, records in metrics.items():
        # host buffers come from a pool: after warm-up (and the extra window the corrupt copy
        # kept in flight) no iteration allocates, and the memory held stays bounded
        allocations = [r["host_allocations"] for r in records]
        held = [r["host_bytes_held"] for r in records]
        assert allocations[-6:] == [allocations[-6]] * 6, (rank, allocations)
        assert allocations[-1] <= 12, (rank, allocations)
        assert max(held[-6:]) <= max(held[:-6]), (rank, held)


def test_bad_moetion_flags_fail_before_training(tmp_path):
    for flag, value, message in [
            ("--moetion-window", "-1", "must be an integer >= 0 (0 = automatic); got -1"),
            ("--moetion-replication-factor", "x", "expected int, got 'x'")]:
        cfg = RunConfig(train_iters=4, moetion=True, extra_flags=(flag, value))
        result = run_pretrain(cfg, tmp_path / flag, timeout_s=240)
        assert result.returncode != 0
        log = result.log_path.read_text()
        assert f"argument {flag}: {message}" in log
        assert "iteration        1/" not in log
