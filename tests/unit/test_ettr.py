"""ETTR: the analytic model, the failure simulator, and the paper comparison."""

import math

import pytest

from megatron_moetion.bench.ettr import (
    CheckFreqScheme,
    GeminiScheme,
    MoCScheme,
    MoEtionScheme,
    ettr_analytic,
    expected_recovery_dense,
    expected_recovery_moetion,
    load_failure_trace,
    simulate,
    young_daly_interval,
)
from megatron_moetion.bench.ettr_inputs import derive_inputs
from megatron_moetion.bench.ettr_paper import (
    PAPER_671B,
    RUN_S,
    apply_measured,
    ettr_table,
    paper_reported,
)
from megatron_moetion.bench.presets import DEEPSEEK_MOE_16B


def paper_schemes(mtbf_s=600):
    return derive_inputs(DEEPSEEK_MOE_16B).schemes(mtbf_s)


def test_analytic_formula_spot_checks():
    assert ettr_analytic(1.0, 0.0, 1, 0.0, 600) == 1.0
    assert ettr_analytic(1.0, 0.1, 10, 60.0, 600) == pytest.approx(1 / 1.01 / 1.1)
    assert ettr_analytic(2.0, 2.0, 1, 0.0, 600) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mtbf_s"):
        ettr_analytic(1.0, 0.0, 1, 0.0, 0)


def test_expected_recovery_helpers():
    assert expected_recovery_dense(2.0, 10, 5.0) == 15.0
    assert expected_recovery_moetion(1.0, 3) == 4.5
    assert expected_recovery_moetion(1.0, 3, overhead_s=2.0) == 6.5


def test_young_daly_value_and_floor():
    assert young_daly_interval(20.0, 600.0, 1.0) == pytest.approx(math.sqrt(24000))
    assert young_daly_interval(1e-6, 1.0, 10.0) == 1.0


@pytest.mark.parametrize(("t_ckpt", "mtbf", "t_iter"), [(20, 600, 1), (5, 3600, 0.5),
                                                          (40, 1800, 2)])
def test_young_daly_maximises_the_analytic_ettr(t_ckpt, mtbf, t_iter):
    def f(k):
        return ettr_analytic(t_iter, t_ckpt, k, expected_recovery_dense(t_iter, k), mtbf)

    best = max(f(k) for k in range(1, 5000))
    assert f(young_daly_interval(t_ckpt, mtbf, t_iter)) >= best - 1e-12


def test_no_failures_moetion_ettr_is_the_stall_factor():
    s = MoEtionScheme(t_iter_s=1.3, stall_s=0.05, window_iters=3)
    r = simulate(s, total_time_s=10_000)
    assert r.num_failures == 0 and r.recovery_s == 0
    assert r.ettr == pytest.approx(1 / (1 + 0.05 / 1.3), rel=1e-12)


def test_no_failures_dense_ettr_is_the_stall_factor():
    s = GeminiScheme(t_iter_s=1.0, ckpt_stall_s=3.0, interval_iters=10)
    r = simulate(s, target_iters=1000)
    assert r.iterations == 1000
    assert r.ettr == pytest.approx(1 / (1 + 3.0 / 10), rel=1e-12)


def test_exact_accounting_moetion():
    # W=3, failure at 10.5 s: 10 done, last window ends at 9: 2 conversion + 1 catch-up
    s = MoEtionScheme(1.0, 0.0, 3, conversion_saving=0.0, localized_saving=0.0)
    r = simulate(s, target_iters=20, failures=[10.5])
    assert r.recovery_s == pytest.approx(0.5 + 3.0)
    assert r.total_s == pytest.approx(23.5) and r.useful_s == 20


def test_exact_accounting_moetion_savings_and_epochs():
    s = MoEtionScheme(1.0, 0.0, 3, fixed_recovery_s=1.0, conversion_saving=0.5,
                      localized_saving=0.5)
    # failure 1 at 10.5: 0.5 lost + 1 + 0.5*(2*0.5 + 1) = 2.5; resumes at 12.5 with 10 done
    # failure 2 at 14.0 (11 done, no window since): anchor still 9, 0.5 lost + 1 + 0.5*(1 + 2)
    r = simulate(s, target_iters=20, failures=[10.5, 14.0])
    assert r.recovery_s == pytest.approx(2.5 + 3.0)
    assert r.num_failures == 2 and r.restarts == 0


def test_exact_accounting_dense():
    s = GeminiScheme(t_iter_s=1.0, ckpt_stall_s=1.0, load_s=2.0, interval_iters=4)
    r = simulate(s, target_iters=8, failures=[7.5])
    # 6 done at 7.0 (stall after 4); 0.5 lost; load 2 + 2 iterations since the checkpoint
    assert r.recovery_s == pytest.approx(4.5)
    assert r.stall_s == pytest.approx(2.0) and r.useful_s == 8
    assert r.total_s == pytest.approx(14.5)


def test_failure_during_recovery_restarts_it():
    s = GeminiScheme(t_iter_s=1.0, ckpt_stall_s=0.0, load_s=10.0, interval_iters=100)
    r = simulate(s, target_iters=20, failures=[5.5, 8.0, 8.0])
    assert r.num_failures == 3 and r.restarts == 2
    # 0.5 lost, 2.5 s of the first recovery, 0 of the second, then 10 + 5 in full
    assert r.recovery_s == pytest.approx(0.5 + 2.5 + 15.0)
    assert r.total_s == pytest.approx(r.useful_s + r.stall_s + r.recovery_s)


def test_simulator_is_deterministic_for_a_seed():
    s = paper_schemes()["gemini"]
    a = simulate(s, total_time_s=RUN_S, mtbf_s=600, seed=7)
    b = simulate(s, total_time_s=RUN_S, mtbf_s=600, seed=7)
    c = simulate(s, total_time_s=RUN_S, mtbf_s=600, seed=8)
    assert a == b and a != c
    assert a.total_s <= RUN_S + 1e-6


def test_trace_replay(tmp_path):
    trace = tmp_path / "failures.txt"
    trace.write_text("# GCP-style trace\n100\n\n  250.5  # second\n900\n")
    assert load_failure_trace(trace) == [100.0, 250.5, 900.0]
    s = MoEtionScheme(1.0, 0.02, 3)
    r = simulate(s, total_time_s=500, failures=trace)
    assert r.num_failures == 2
    assert r == simulate(s, total_time_s=500, failures=[100.0, 250.5, 900.0])
    g = simulate(GeminiScheme(1.0, 5.0), total_time_s=500, failures=str(trace))
    assert g.interval_iters == round(young_daly_interval(5.0, 300.0, 1.0))  # trace mean gap
    bad = tmp_path / "bad.txt"
    bad.write_text("10\nsoon\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_failure_trace(bad)


def test_simulate_argument_checks():
    s = MoEtionScheme(1.0, 0.0, 3)
    with pytest.raises(ValueError, match="exactly one"):
        simulate(s)
    with pytest.raises(ValueError, match="exactly one"):
        simulate(s, total_time_s=10, target_iters=10)
    with pytest.raises(ValueError, match="mtbf_s"):
        simulate(GeminiScheme(1.0, 5.0), total_time_s=10)


@pytest.mark.parametrize(("make", "field"), [
    (lambda: MoEtionScheme(1.0, 0.0, 0), "window_iters"),
    (lambda: MoEtionScheme(0.0, 0.0, 3), "t_iter_s"),
    (lambda: MoEtionScheme(1.0, -1.0, 3), "stall_s"),
    (lambda: MoEtionScheme(1.0, 0.0, 3, conversion_saving=1.0), "conversion_saving"),
    (lambda: GeminiScheme(1.0, -2.0), "ckpt_stall_s"),
    (lambda: CheckFreqScheme(1.0, 2.0, interval_iters=0), "interval_iters"),
    (lambda: MoCScheme(1.0, 1.0, fraction=0.0), "fraction"),
    (lambda: MoCScheme(1.0, 1.0, doubling_failures=0), "doubling_failures"),
])
def test_bad_scheme_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def _mean(scheme, attr, runs=8, mtbf=600):
    return sum(getattr(simulate(scheme, total_time_s=RUN_S, mtbf_s=mtbf, seed=i), attr)
               for i in range(runs)) / runs


def test_moetion_beats_checkfreq_and_moc_at_ten_minutes():
    s = paper_schemes()
    moetion = _mean(s["moetion"], "ettr")
    assert moetion > _mean(s["checkfreq"], "ettr") > _mean(s["moc"], "ettr")
    assert s["moetion"].analytic(600) > s["checkfreq"].analytic(600) > s["moc"].analytic(600)


def test_moc_reports_lost_tokens_and_its_overhead_grows():
    s = paper_schemes()["moc"]
    r = simulate(s, total_time_s=RUN_S, mtbf_s=600, seed=1)
    assert r.tokens_lost_iters > 0 and 0 < r.tokens_lost_fraction < 1
    fixed = MoCScheme(s.t_iter_s, s.full_stall_s, s.fraction, s.load_s)
    f = simulate(fixed, total_time_s=RUN_S, mtbf_s=600, seed=1)
    assert r.stall_s / r.useful_s > f.stall_s / f.useful_s  # growing fraction, growing stall
    assert r.tokens_lost_iters < f.tokens_lost_iters
    full = simulate(MoCScheme(1.0, 1.0, fraction=1.0), total_time_s=5000, mtbf_s=600)
    assert full.num_failures > 0 and full.tokens_lost_iters == 0


def test_measured_overrides():
    base = paper_schemes()
    m = apply_measured(base, {"t_iter_s": 2.0, "window": 5, "stall_s": {"moetion": 0.0,
                              "gemini": 3.0}, "recovery_s": {"checkfreq": 7.0}})
    assert m["moetion"].t_iter_s == 2.0 and m["moetion"].window_iters == 5
    assert m["moetion"].stall_s == 0.0 and m["gemini"].ckpt_stall_s == 3.0
    assert m["checkfreq"].load_s == 7.0 and m["moc"].t_iter_s == 2.0
    assert m["gemini"].interval_iters is None  # Young/Daly re-picks it for the measured stall
    with pytest.raises(ValueError, match="unknown measured keys"):
        apply_measured(base, {"iteration_time": 1.0})
    with pytest.raises(ValueError, match="unknown schemes"):
        apply_measured(base, {"stall_s": {"deepspeed": 1.0}})


def test_ettr_table_rows_markdown_and_explanations():
    table = ettr_table(num_runs=3)
    assert len(table.rows) == 4 * 4
    assert {r.scheme for r in table.rows} == {"moetion", "gemini", "checkfreq", "moc"}
    assert "0.728" in table.markdown and "0.951-0.964" in table.markdown
    assert all(r.analytic_bare >= r.analytic for r in table.rows)
    assert table.markdown.isascii() and all(e.isascii() for e in table.explanations)
    expected = 0
    for r in table.rows:
        assert 0 < r.simulated <= 1 and 0 < r.analytic <= 1
        for pv in r.paper:
            for which, ours in (("simulated", r.simulated), ("analytic", r.analytic)):
                if pv.distance(ours) > 0.03:
                    expected += 1
                    head = f"{r.scheme} at MTBF {r.mtbf_s / 60:.0f} min: {which} {ours:.3f}"
                    assert any(e.startswith(head) and pv.source in e
                               for e in table.explanations), head
    assert len(table.explanations) == expected
    gemini_600 = next(r for r in table.rows if r.scheme == "gemini" and r.mtbf_s == 600)
    assert {pv.lo for pv in gemini_600.paper} == {0.728, 0.76, 0.47}


def test_ettr_table_accepts_measurements():
    base = ettr_table(mtbfs_s=(600,), num_runs=2)
    slow = ettr_table(mtbfs_s=(600,), num_runs=2, measured={"stall_s": {"moetion": 0.5}})
    row = {r.scheme: r for r in base.rows}["moetion"]
    row_slow = {r.scheme: r for r in slow.rows}["moetion"]
    assert row.stall_fraction == 0  # derived: the window's copy and replication fit
    assert row_slow.simulated < row.simulated and row_slow.stall_fraction > 0


def test_paper_reported_values():
    values = paper_reported()
    assert all(0 < v.lo <= v.hi < 1 for v in values)
    moetion = [v for v in values if v.scheme == "moetion" and v.mtbf_s == 600]
    assert any((v.lo, v.hi) == (0.951, 0.964) for v in moetion)
    at_most = next(v for v in values if v.kind == "at most")
    assert at_most.distance(0.5) == 0 and at_most.distance(0.85) == pytest.approx(0.06)
    big = paper_reported(PAPER_671B)
    assert {(v.scheme, v.lo) for v in big} == {("moetion", 0.86), ("gemini", 0.55)}
    assert paper_reported("no such model") == []
