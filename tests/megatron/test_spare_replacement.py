"""A killed worker replaced in place by a warm spare while the survivors keep their state.

Real processes, one per rank plus spares, around a store the launcher hosts (nothing tears the
job down when a worker dies, as on a multi-node job). A planned SIGKILL (or SIGSTOP, fenced)
ends one worker; the survivors learn of it from the liveness verdict, keep their state in
memory, rebuild every process group with a spare at the dead rank's place, and the localized
recovery restores the spare from its buddies: only the dead rank's stage replays, nobody
reloads a checkpoint, and the run ends bitwise identical to the fault-free one. A negative
control (survivors that lose their optimizer state across the rebuild) must fail the oracle.

`make test` runs two kills in one run (the last stage at forward, then at backward the stage
peer of the rank the first spare replaced), a middle stage at the optimizer step, a kill during
conversion and the negative control; `make test-extended` adds single kills of the last stage at
forward, the first stage at backward, the last stage during replication, a rank that stops
answering, a second kill with no spare left (the fallback to the checkpoint), and the soak
(ten random kills in a hundred iterations).
"""

import pytest
from test_process_failures import DEMO, DETECT, PP4, processes_mentioning

from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]


def run_replaced(run_cache, run_ok, tmp_path, plan, base=DEMO, spares=1, flags=(),
                 detect=DETECT, timeout_s=300):
    cfg = base.replace(fault_plan=plan, save_interval=4, extra_flags=detect + tuple(flags),
                       spares=spares)
    out = run_ok(cfg, tmp_path, timeout_s=timeout_s)
    assert processes_mentioning(tmp_path) == []
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    assert not [r for r in records if r.get("kind") == "restart"]  # no global rollback
    return out, records


def replacements(records):
    return [r for r in records if r.get("cause") == "process_failure"]


def recoveries(records):
    return [r for r in records if r.get("kind") == "recovery" and "ranks_paused" in r]


def test_two_kills_the_second_beside_the_first_replacement(run_cache, run_ok, tmp_path):
    # rank 2 dies at forward and spare 4 takes its place; later its stage peer, rank 3, dies at
    # backward: the former spare is now a survivor that replays with the second spare (its
    # state, windows and round numbering must be those of a rank that was there all along)
    base = DEMO.replace(train_iters=20)
    out, records = run_replaced(run_cache, run_ok, tmp_path,
                                "rank=2,iter=10,phase=fwd,kind=kill;"
                                "rank=3,iter=18,phase=bwd,kind=kill", base=base, spares=2)
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    by_generation = {r["generation"]: r for r in replacements(records)}
    assert by_generation[1]["replaced_by"] == {"2": 4}
    assert by_generation[2]["replaced_by"] == {"3": 5}
    second = [r for r in recoveries(records) if r["fault_iteration"] == 18]
    assert second and second[0]["ranks_replaying"] == [2, 3]
    assert second[0]["ranks_paused"] == [0, 1]
    # windows kept being shipped after the first replacement (the spare continues the job's
    # window and round numbering; were it not, every later window would be skipped)
    assert any(r.get("window_closed") == "shipped" and 10 < r["iteration"] < 18
               for r in records)


@pytest.mark.parametrize("plan, dead, replaying, paused", [
    pytest.param("rank=2,iter=10,phase=fwd,kind=kill", 2, [2, 3], [0, 1],
                 marks=pytest.mark.extended),
    pytest.param("rank=0,iter=10,phase=bwd,kind=kill", 0, [0, 1], [2, 3],
                 marks=pytest.mark.extended),
    pytest.param("rank=3,iter=10,phase=replication,kind=kill", 3, [2, 3], [0, 1],
                 marks=pytest.mark.extended),
], ids=["last_stage_forward", "first_stage_backward", "last_stage_replication"])
def test_killed_rank_is_replaced_and_survivors_keep_their_state(run_cache, run_ok, tmp_path,
                                                                 plan, dead, replaying, paused):
    out, records = run_replaced(run_cache, run_ok, tmp_path, plan)
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert result.identical, result
    reports = replacements(records)
    survivors = sorted(set(range(4)) - {dead})
    assert sorted(r["rank"] for r in reports) == survivors  # every survivor reported it
    for r in reports:
        assert r["failed"] == [dead] and r["replaced_by"] == {str(dead): 4}
        assert r["fallback"] is False and r["generation"] == 1
        assert 0 < r["detection_s"] < 15
    rec = recoveries(records)[0]
    assert rec["failed"] == [dead]
    assert rec["ranks_replaying"] == replaying and rec["ranks_paused"] == paused


def test_killed_middle_stage_at_the_optimizer_step(run_cache, run_ok, tmp_path):
    out, records = run_replaced(run_cache, run_ok, tmp_path,
                                "rank=2,iter=10,phase=step,kind=kill", base=PP4)
    result = compare_dumps(run_cache.get(PP4) / "oracle", out / "oracle")
    assert result.identical, result
    rec = recoveries(records)[0]
    assert rec["ranks_replaying"] == [2] and rec["ranks_paused"] == [0, 1, 3]


@pytest.mark.extended
def test_stopped_rank_is_fenced_and_replaced(run_cache, run_ok, tmp_path):
    out, records = run_replaced(run_cache, run_ok, tmp_path,
                                "rank=1,iter=10,phase=fwd,kind=hang")
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert result.identical, result
    assert {r["failed"][0] for r in replacements(records)} == {1}


def test_kill_during_conversion(run_cache, run_ok, tmp_path):
    # rank 1 loses its state; while ranks 0 and 1 replay, rank 0's process is killed: the
    # recovery restarts in the next generation with the spare at rank 0 and rank 1 again
    plan = "rank=1,iter=9,phase=fwd,kind=lose_state;rank=0,iter=9,phase=recovery,kind=kill"
    out, records = run_replaced(run_cache, run_ok, tmp_path, plan)
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert result.identical, result
    final = [r for r in recoveries(records) if r["rank"] == 2][-1]
    assert final["failed"] == [0, 1] and final["ranks_paused"] == [2, 3]


def test_negative_control_survivors_that_lose_optimizer_state_fail_the_oracle(
        run_cache, run_ok, tmp_path):
    out, _ = run_replaced(run_cache, run_ok, tmp_path, "rank=2,iter=10,phase=fwd,kind=kill",
                          base=PP4, flags=("--moetion-negative-control", "stale_survivors"))
    result = compare_dumps(run_cache.get(PP4) / "oracle", out / "oracle")
    assert not result.identical


SOAK_KILLS = 10


def soak_plan(seed: int = 7, iters: int = 100, kills: int = SOAK_KILLS) -> str:
    """``kills`` faults about every ``iters / kills`` iterations, each at a random rank and
    phase, mostly SIGKILL and some SIGSTOP (fenced)."""
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
@pytest.mark.timeout(1800)
def test_soak_ten_random_kills_in_a_hundred_iterations(run_cache, run_ok, tmp_path):
    base = DEMO.replace(train_iters=100)
    plan = soak_plan()
    # fourteen processes on two cores: a 5 s detect timeout, so that no live rank is taken
    # for dead under the load (every replacement uses up a spare)
    out, records = run_replaced(run_cache, run_ok, tmp_path, plan, base=base,
                                spares=SOAK_KILLS, timeout_s=1500,
                                detect=("--moetion-heartbeat-interval-s", "0.5",
                                        "--moetion-detect-timeout-s", "5"))
    result = compare_dumps(run_cache.get(base, timeout_s=900) / "oracle", out / "oracle")
    assert result.identical, result
    by_generation = {r["generation"]: r for r in replacements(records)}
    assert sorted(by_generation) == list(range(1, SOAK_KILLS + 1))  # every kill replaced
    assert not [r for r in records if r.get("fallback")]
    for failure in plan.split(";"):  # each one was recovered and reported
        rank, iteration = (int(kv.split("=")[1]) for kv in failure.split(",")[:2])
        assert any(r["failed"] == [rank] and r["fault_iteration"] >= iteration
                   for r in by_generation.values()), failure


@pytest.mark.extended
def test_no_spare_left_falls_back_to_the_checkpoint(run_cache, run_ok, tmp_path):
    # one spare for two kills: the second failure cannot be replaced in place, every rank stops
    # for a restart from the last persistent checkpoint (the runner plays the scheduler)
    base = DEMO.replace(train_iters=20)
    cfg = base.replace(fault_plan="rank=2,iter=10,phase=fwd,kind=kill;"
                                  "rank=3,iter=18,phase=bwd,kind=kill",
                       save_interval=4, extra_flags=DETECT, spares=1)
    out = run_ok(cfg, tmp_path, max_restarts=1)
    assert processes_mentioning(tmp_path) == []
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    by_generation = {}
    for r in replacements(records):
        by_generation.setdefault(r["generation"], r)
    assert by_generation[1]["replaced_by"] == {"2": 4} and not by_generation[1]["fallback"]
    assert by_generation[2]["fallback"] is True
    assert by_generation[2]["fallback_reason"].startswith("no warm spare left for rank 3")
    restarts = [r for r in records if r.get("kind") == "restart"]
    assert restarts and {r["checkpoint_iteration"] for r in restarts} == {16}
