"""Megatron's ``--inprocess-restart`` replaces a dead rank while the survivors keep their state.

Real processes as srun starts them (one per rank and reserve rank, ``RANK``/``WORLD_SIZE``
counting both); nvidia-resiliency-ext's in-process ``Wrapper`` (0.4.1 here, Python 3.11)
detects the death with its monitor processes, aborts every rank's process groups, activates a
reserve rank in the dead rank's place and calls training again. Survivors move their kept
state into the new objects (no ``--load``, no replay on their stage), the reserve rank is
restored by the localized recovery, and the run ends bitwise identical to the fault-free one.

With ``external_stores`` the restart's two stores live in the launcher (as
``python -m megatron_moetion.store_host`` hosts them), so rank 0 is replaceable too.

`make test` kills a middle stage; kills rank 0 (its stores outside it) while it replays a
conversion; and runs the negative control (survivors that lose their optimizer state across the
restart must fail the oracle). `make test-extended` adds rank 0 killed at backward, a middle
stage killed at the optimizer step, the last stage during replication, a second kill after the
first replacement, a rank that stops answering (the Wrapper's soft timeout), a kill with no
reserve left (the fallback to the persistent checkpoint), and the soak (ten random kills in a
hundred iterations).
"""

import pytest
from test_process_failures import DEMO, PP4, processes_mentioning

from megatron_moetion.adapter.nvrx_restart import decide_resume
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(500)]


def run_restarted(run_ok, tmp_path, plan, base=PP4, reserves=1, flags=(), timeout_s=400,
                  max_restarts=0, external_stores=False):
    cfg = base.replace(fault_plan=plan, save_interval=4, spares=reserves,
                       external_stores=external_stores).with_flags(*flags)
    out = run_ok(cfg, tmp_path, timeout_s=timeout_s, max_restarts=max_restarts)
    assert processes_mentioning(tmp_path) == []  # monitor processes included
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    return out, records


def restarts(records):
    return [r for r in records if r.get("engine") == "nvrx"]


def recoveries(records):
    return [r for r in records if r.get("kind") == "recovery" and "ranks_paused" in r]


def test_killed_middle_stage_is_replaced_by_a_reserve_rank(run_cache, run_ok, tmp_path):
    out, records = run_restarted(run_ok, tmp_path, "rank=2,iter=10,phase=fwd,kind=kill")
    result = compare_dumps(run_cache.get(PP4) / "oracle", out / "oracle")
    assert result.identical, result
    reports = restarts(records)
    assert sorted(r["rank"] for r in reports) == [0, 1, 3]  # every survivor, none reloaded
    for r in reports:
        assert r["outcome"] == "replace_in_place" and r["failed"] == [2]
        assert r["replaced_by"] == {"2": 4} and r["generation"] == 1
    assert not [r for r in records if r.get("kind") == "restart"]  # no global rollback
    (rec,) = {r["fault_iteration"]: r for r in recoveries(records)}.values()
    assert rec["failed"] == [2] and rec["ranks_replaying"] == [2]
    assert rec["ranks_paused"] == [0, 1, 3]


def test_rank_zero_killed_during_a_conversion_with_the_stores_outside_it(
        run_cache, run_ok, tmp_path):
    # rank 1 loses its state; while ranks 0 and 1 replay, rank 0's process is killed: the
    # recovery starts again after the restart, with a reserve rank at rank 0 and rank 1 again
    plan = "rank=1,iter=9,phase=fwd,kind=lose_state;rank=0,iter=9,phase=recovery,kind=kill"
    out, records = run_restarted(run_ok, tmp_path, plan, base=DEMO, external_stores=True)
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert result.identical, result
    assert {r["rank"] for r in restarts(records)} == {1, 2, 3}
    assert {str(r["replaced_by"]) for r in restarts(records)} == {"{'0': 4}"}
    final = [r for r in recoveries(records) if r["rank"] == 2][-1]
    assert final["failed"] == [0, 1] and final["ranks_paused"] == [2, 3]


def test_negative_control_survivors_that_lose_optimizer_state_fail_the_oracle(
        run_cache, run_ok, tmp_path):
    out, _ = run_restarted(run_ok, tmp_path, "rank=2,iter=10,phase=fwd,kind=kill",
                           flags=("--moetion-negative-control", "stale_survivors"))
    result = compare_dumps(run_cache.get(PP4) / "oracle", out / "oracle")
    assert not result.identical


@pytest.mark.extended
@pytest.mark.parametrize("plan, base, replaying, paused", [
    ("rank=0,iter=10,phase=bwd,kind=kill", DEMO, [0, 1], [2, 3]),
    ("rank=2,iter=10,phase=step,kind=kill", PP4, [2], [0, 1, 3]),
], ids=["rank_zero_at_backward", "middle_stage_at_the_optimizer_step"])
def test_killed_rank_with_the_stores_outside_every_rank(run_cache, run_ok, tmp_path, plan, base,
                                                        replaying, paused):
    out, records = run_restarted(run_ok, tmp_path, plan, base=base, external_stores=True)
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    rec = recoveries(records)[0]
    assert rec["ranks_replaying"] == replaying and rec["ranks_paused"] == paused


# a rank that stops answering: the Wrapper's monitor sees no progress for the soft timeout, and
# the hard timeout kills it
HANG_TIMEOUTS = ("--inprocess-soft-timeout", "20", "--inprocess-hard-timeout", "30",
                 "--inprocess-heartbeat-interval", "5", "--inprocess-heartbeat-timeout", "25",
                 "--inprocess-barrier-timeout", "120")


@pytest.mark.extended
@pytest.mark.parametrize("plan, flags, dead", [
    ("rank=3,iter=7,phase=replication,kind=kill", (), 3),
    ("rank=2,iter=10,phase=step,kind=hang", HANG_TIMEOUTS, 2),
], ids=["last_stage_killed_during_replication", "rank_that_stops_answering"])
def test_single_failure_is_replaced(run_cache, run_ok, tmp_path, plan, flags, dead):
    out, records = run_restarted(run_ok, tmp_path, plan, flags=flags)
    assert compare_dumps(run_cache.get(PP4) / "oracle", out / "oracle").identical
    assert {r["failed"][0] for r in restarts(records)} == {dead}


@pytest.mark.extended
def test_second_kill_after_the_first_replacement(run_cache, run_ok, tmp_path):
    base = PP4.replace(train_iters=16)
    out, records = run_restarted(run_ok, tmp_path, "rank=2,iter=7,phase=fwd,kind=kill;"
                                 "rank=1,iter=12,phase=bwd,kind=kill", base=base, reserves=2)
    assert compare_dumps(run_cache.get(base) / "oracle", out / "oracle").identical
    by_generation = {r["generation"]: r for r in restarts(records)}
    first, second = by_generation[1]["replaced_by"], by_generation[2]["replaced_by"]
    assert list(first) == ["2"] and list(second) == ["1"]
    assert {first["2"], second["1"]} == {4, 5}  # each reserve rank once


@pytest.mark.extended
def test_no_reserve_left_falls_back_to_the_checkpoint(run_cache, run_ok, tmp_path):
    base = PP4.replace(train_iters=16)
    out, records = run_restarted(run_ok, tmp_path, "rank=2,iter=7,phase=fwd,kind=kill;"
                                 "rank=1,iter=11,phase=fwd,kind=kill", base=base,
                                 max_restarts=1)
    assert compare_dumps(run_cache.get(base) / "oracle", out / "oracle").identical
    fallbacks = [r for r in records if r.get("fallback")]
    assert fallbacks and all("no reserve rank left" in r["fallback_reason"] for r in fallbacks)
    assert [r for r in records if r.get("kind") == "restart"]  # the rollback is reported


def test_where_every_rank_resumes():
    kept = {"iteration": 10, "next_window_id": 3}
    assert decide_resume({0: {"resume": kept}, 1: {"resume": None}, 2: {"resume": kept}}) == (
        kept, "")
    assert decide_resume({0: {"resume": None}, 1: {"resume": None}}) == ({}, "")
    resume, why = decide_resume({0: {"resume": kept}, 1: {"resume": {"iteration": 11,
                                                                      "after_step": True}}})
    assert resume is None and "stopped after an optimizer step" in why
    resume, why = decide_resume({0: {"resume": kept}, 1: {"resume": {"iteration": 10,
                                                                      "in_step": True}}})
    assert resume is None and "inside an optimizer step" in why
    resume, why = decide_resume({0: {"resume": kept}, 1: {"resume": {"iteration": 9}}})
    assert resume is None and "different points" in why


SOAK_KILLS = 10


def soak_plan(seed: int = 7, iters: int = 100, kills: int = SOAK_KILLS) -> str:
    """``kills`` faults about every ``iters / kills`` iterations, each at a random rank and
    phase, mostly SIGKILL and some SIGSTOP (released by the Wrapper's timeouts)."""
    import random

    rng = random.Random(seed)
    step = iters // (kills + 1)
    faults = []
    for k in range(kills):
        kind = "hang" if rng.random() < 0.2 else "kill"
        faults.append(f"rank={rng.randrange(4)},iter={step * (k + 1)},"
                      f"phase={rng.choice(['fwd', 'bwd', 'step', 'replication'])},kind={kind}")
    return ";".join(faults)


@pytest.mark.extended
@pytest.mark.timeout(2400)
def test_soak_ten_random_kills_in_a_hundred_iterations(run_cache, run_ok, tmp_path):
    base = DEMO.replace(train_iters=100)
    plan = soak_plan()
    out, records = run_restarted(run_ok, tmp_path, plan, base=base, reserves=SOAK_KILLS,
                                 flags=HANG_TIMEOUTS, timeout_s=2100, external_stores=True)
    result = compare_dumps(run_cache.get(base, timeout_s=900) / "oracle", out / "oracle")
    assert result.identical, result
    by_generation = {r["generation"]: r for r in restarts(records)}
    assert sorted(by_generation) == list(range(1, SOAK_KILLS + 1))  # every kill replaced
    assert not [r for r in records if r.get("fallback")]
    for failure in plan.split(";"):  # each one was recovered and reported
        rank = int(failure.split(",")[0].split("=")[1])
        assert any(r["failed"] == [rank] for r in by_generation.values()), failure

