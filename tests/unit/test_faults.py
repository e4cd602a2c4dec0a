"""FaultPlan parsing: the grammar, and errors that name the entry and what is allowed."""

import pytest

from megatron_moetion.errors import FaultPlanError
from megatron_moetion.fault_plan import Fault, FaultPlan


def test_parse_several_faults():
    plan = FaultPlan.parse("rank=3,iter=12,phase=bwd,kind=lose_state; rank=0,iter=20,phase=step")
    assert plan.faults == (Fault(3, 12, "bwd", "lose_state"), Fault(0, 20, "step", "lose_state"))
    assert str(plan) == "rank=3,iter=12,phase=bwd,kind=lose_state;rank=0,iter=20,phase=step,kind=lose_state"
    assert FaultPlan.parse(str(plan)) == plan


def test_process_failure_kinds_parse_in_every_phase():
    for phase in ("fwd", "bwd", "step", "snapshot", "replication", "recovery"):
        for kind in ("kill", "hang"):
            (fault,) = FaultPlan.parse(f"rank=1,iter=4,phase={phase},kind={kind}").faults
            assert (fault.phase, fault.kind) == (phase, kind)


def test_empty_plan_is_falsy():
    assert not FaultPlan.parse("")
    assert not FaultPlan.parse(" ; ")


def test_fluent_builder():
    plan = FaultPlan().fail_at(1, 5, "fwd").fail_at(2, 7, "recovery")
    assert [f.rank for f in plan.faults] == [1, 2]
    assert plan.for_rank(2) == [Fault(2, 7, "recovery", "lose_state")]


@pytest.mark.parametrize("text, message", [
    ("rank=1", "'iter' is required"),
    ("iter=3", "'rank' is required"),
    ("rank=a,iter=3", "rank and iter must be integers"),
    ("rank=1,iter=0", r"iter must be >= 1"),
    ("rank=-1,iter=3", "rank must be >= 0"),
    ("rank=1,iter=3,phase=later", "phase must be one of fwd, bwd, step, snapshot, replication, recovery"),
    ("rank=1,iter=3,kind=explode", "kind must be one of"),
    ("rank=1,iter=3,color=red", "unknown key"),
    ("rank=1,iter=3,rank=2", "'rank' given twice"),
    ("rank=1,iter", "expected comma-separated key=value"),
    ("rank=1,iter=3,phase=fwd,kind=corrupt_replica", "corrupt_replica needs phase=replication"),
])
def test_malformed_plans(text, message):
    with pytest.raises(FaultPlanError, match=message):
        FaultPlan.parse(text)


def test_rank_outside_the_world():
    plan = FaultPlan.parse("rank=4,iter=3")
    with pytest.raises(FaultPlanError, match=r"rank must be in \[0, 3\]"):
        plan.validate_world(4)


def test_a_fault_fires_once_per_job_across_restarts(tmp_path):
    from megatron_moetion.adapter.fault_injection import FaultInjector

    plan = FaultPlan.parse("rank=1,iter=4,phase=fwd,kind=kill;rank=1,iter=9,phase=bwd,kind=hang")
    log = str(tmp_path / "ckpt" / "moetion_faults_fired.jsonl")
    first = FaultInjector(plan, 1, 4, fired_log=log)
    assert [str(f) for f in first.due("fwd", 4)] == ["rank=1,iter=4,phase=fwd,kind=kill"]
    restarted = FaultInjector(plan, 1, 4, fired_log=log)  # the job came back from its checkpoint
    assert restarted.skipped == 1 and restarted.due("fwd", 4) == []
    assert [f.iteration for f in restarted.due("bwd", 9)] == [9]
