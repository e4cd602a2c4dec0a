"""Summaries of a run's metrics files, for the demo's report."""

from __future__ import annotations

import statistics

from megatron_moetion.metrics import read_metrics


def snapshot_summary(metrics_dir, replication_factor: int) -> dict:
    """Per-rank snapshot costs, averaged over ranks and the iterations that took a snapshot."""
    metrics = read_metrics(metrics_dir)
    snap, dense, stall, held, windows = [], [], [], [], set()
    for records in metrics.values():
        for r in records:
            if r.get("snapshot_bytes") is not None:
                snap.append(r["snapshot_bytes"])
                dense.append(r["dense_bytes"])
                windows.add(r["window_size"])
            if r.get("stall_ms") is not None and r.get("iteration", 0) > 1:
                stall.append(r["stall_ms"])
        if records:
            held.append(records[-1]["host_bytes_held"])
    mean = statistics.fmean(snap) if snap else 0.0
    dense_mean = statistics.fmean(dense) if dense else 0.0
    return {
        "window": max(windows) if windows else None,
        "bytes_per_iter_mean": round(mean),
        "dense_bytes_per_iter": round(dense_mean),
        "ratio_to_dense": round(mean / dense_mean, 4) if dense_mean else None,
        "stall_ms_median": round(statistics.median(stall), 3) if stall else None,
        "replication_factor": replication_factor,
        "host_bytes_held": max(held) if held else 0,
    }
