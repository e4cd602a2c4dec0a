"""Benchmark plots write non-empty PNGs, also with partial or missing data."""

import math

import pytest

pytest.importorskip("matplotlib")

from megatron_moetion.bench.ettr_paper import ettr_table  # noqa: E402
from megatron_moetion.bench.plots import (  # noqa: E402
    plot_ettr_vs_mtbf,
    plot_recovery_phases,
    plot_stall_per_iteration,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_ettr_vs_mtbf_from_ettr_table(tmp_path):
    rows = ettr_table(mtbfs_s=(3600, 600), num_runs=1).rows
    out = plot_ettr_vs_mtbf(rows, tmp_path / "ettr.png")
    assert out == tmp_path / "ettr.png" and _is_png(out)


def test_ettr_vs_mtbf_with_partial_dict_rows(tmp_path):
    rows = [
        {"scheme": "moetion", "mtbf_s": 600, "simulated": 0.97},
        {"scheme": "moetion", "mtbf_s": 1800, "analytic": 0.98, "simulated": None},
        {"scheme": "gemini", "mtbf_s": 600, "paper": [{"lo": 0.728, "hi": 0.728}]},
        {"scheme": "custom", "mtbf_s": 7200, "simulated": math.nan,
         "paper": [{"lo": 0.79, "hi": 0.79, "kind": "at most"}, {"lo": None}]},
        {"scheme": "broken"},  # no MTBF: skipped
    ]
    assert _is_png(plot_ettr_vs_mtbf(rows, tmp_path / "sub" / "partial.png"))


def test_ettr_vs_mtbf_without_rows(tmp_path):
    assert _is_png(plot_ettr_vs_mtbf([], tmp_path / "empty.png"))


def test_stall_per_iteration(tmp_path):
    data = {"moetion": 21.6, "gemini": 1190.0, "checkfreq": None, "moc": float("nan")}
    assert _is_png(plot_stall_per_iteration(data, tmp_path / "stall.png"))
    assert _is_png(plot_stall_per_iteration({}, tmp_path / "stall_empty.png"))


def test_recovery_phases(tmp_path):
    data = {
        "moetion": {"detect": 1.0, "fetch": 1.9, "conversion": 1.4, "catch-up": 0.8},
        "gemini": {"load": 1.6, "recompute": 66.0},
        "moc": None,
        "checkfreq": {"load": 39.4, "recompute": None},
    }
    assert _is_png(plot_recovery_phases(data, tmp_path / "phases.png"))
    assert _is_png(plot_recovery_phases({}, tmp_path / "phases_empty.png"))
    assert _is_png(plot_recovery_phases({"x": {}}, tmp_path / "phases_no_phase.png"))
