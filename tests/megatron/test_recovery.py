"""Localized recovery on real Megatron-Core: every run with faults must end bitwise identical
(per-iteration losses and grad norms, final parameters and optimizer state of every rank) to the
fault-free run; a deliberately wrong recovery must not.

The failure matrix, one test each (iterations are 1-based; W=3 windows start at 2, 5, 8, 11):
single rank; several ranks in different stages; PP=4 first, middle and last stage; two PP=4
stages lost together ((0,1), (1,2), (2,3), (0,2)); a fault during conversion; a paused rank
failing during recovery; faults in consecutive iterations; several expert data-parallel replicas
(DP > EP); a rank and one of its buddies; faults while snapshotting and while replicating; a rank
and both of its buddies, and every copy gone (fallback to the persistent checkpoint, bitwise, and
an error without one); the plain (non-distributed) optimizer.
"""

import pytest

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

DEMO = RunConfig(train_iters=12, moetion=True, window=3)  # PP=2 x EP=2 x DP=2, distopt
PLAIN = DEMO.replace(distributed_optimizer=False)
PP4 = DEMO.replace(pp=4, dp=1, ep=1)  # ranks 0..3 are stages 0..3
DP_OVER_EP = DEMO.replace(ep=1)  # PP=2 x DP=2, every expert on both ranks of a stage


def lose(*faults):
    return ";".join(f"rank={r},iter={i},phase={p},kind=lose_state" for r, i, p in faults)


def recoveries(out):
    return [r for recs in read_metrics(out / "metrics").values() for r in recs
            if r.get("kind") == "recovery" and r["rank"] == 0]


def check(run_cache, run_ok, tmp_path, base, plan, changes=None, **run_kwargs):
    """Run ``base`` with ``plan`` (and config ``changes`` that do not alter training), compare
    with the fault-free run of ``base``, return rank 0's recovery reports."""
    out = run_ok(base.replace(fault_plan=plan, **(changes or {})), tmp_path, **run_kwargs)
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    return recoveries(out)


def test_moetion_without_faults_changes_nothing(run_cache):
    result = compare_dumps(run_cache.get(DEMO.replace(moetion=False)) / "oracle",
                           run_cache.get(DEMO) / "oracle")
    assert result.identical, result


def test_single_rank(run_cache, run_ok, tmp_path):
    (rec,) = check(run_cache, run_ok, tmp_path, DEMO, lose((1, 9, "bwd")))
    assert rec["failed"] == [1] and rec["ranks_replaying"] == [0, 1]  # its stage only
    assert rec["ranks_paused"] == [2, 3] and rec["replayed_iterations"] >= 1
    assert rec["conversion_iterations"] == 2 and rec["attempts"] == 1


def test_several_ranks_in_different_stages(run_cache, run_ok, tmp_path):
    (rec,) = check(run_cache, run_ok, tmp_path, DEMO, lose((0, 9, "step"), (3, 9, "bwd")))
    assert rec["failed"] == [0, 3] and rec["ranks_replaying"] == [0, 1, 2, 3]


@pytest.mark.parametrize("rank, phase", [pytest.param(0, "fwd", marks=pytest.mark.extended),
                                         (2, "bwd"),
                                         pytest.param(3, "step", marks=pytest.mark.extended)],
                         ids=["first_stage", "middle_stage", "last_stage"])
def test_pp4_stage(run_cache, run_ok, tmp_path, rank, phase):
    (rec,) = check(run_cache, run_ok, tmp_path, PP4, lose((rank, 10, phase)))
    assert rec["ranks_replaying"] == [rank] and len(rec["ranks_paused"]) == 3


@pytest.mark.parametrize("stages", [pytest.param((0, 1), marks=pytest.mark.extended),
                                    pytest.param((1, 2), marks=pytest.mark.extended),
                                    pytest.param((2, 3), marks=pytest.mark.extended), (0, 2)],
                         ids=["first_two", "middle_two", "last_two", "first_and_third"])
def test_two_stages_lost_together(run_cache, run_ok, tmp_path, stages):
    a, b = stages
    (rec,) = check(run_cache, run_ok, tmp_path, PP4, lose((a, 10, "fwd"), (b, 10, "bwd")))
    assert rec["ranks_replaying"] == [a, b]
    assert rec["ranks_paused"] == [r for r in range(4) if r not in stages]


def test_fault_during_conversion(run_cache, run_ok, tmp_path):
    (rec,) = check(run_cache, run_ok, tmp_path, DEMO,
                   lose((1, 9, "bwd"), (0, 9, "recovery")))
    assert rec["attempts"] == 2 and rec["failed"] == [0, 1]


def test_paused_rank_fails_during_recovery(run_cache, run_ok, tmp_path):
    # rank 1's stage replays while ranks 2 and 3 pause; rank 2 loses its state while paused,
    # so the recovery restarts with both stages replaying
    (rec,) = check(run_cache, run_ok, tmp_path, DEMO,
                   lose((1, 9, "bwd"), (2, 9, "recovery")))
    assert rec["attempts"] == 2 and rec["failed"] == [1, 2]
    assert rec["ranks_replaying"] == [0, 1, 2, 3]


def test_faults_in_consecutive_iterations(run_cache, run_ok, tmp_path):
    recs = check(run_cache, run_ok, tmp_path, DEMO, lose((1, 9, "bwd"), (2, 10, "fwd")))
    assert [(r["fault_iteration"], r["failed"]) for r in recs] == [(9, [1]), (10, [2])]


def test_several_expert_data_parallel_replicas(run_cache, run_ok, tmp_path):
    # EP=1 with DP=2: each expert has two data-parallel replicas in a stage, whose gradients
    # are all-reduced; the failed rank's replica replays beside its healthy peer
    (rec,) = check(run_cache, run_ok, tmp_path, DP_OVER_EP, lose((1, 9, "bwd")))
    assert rec["ranks_replaying"] == [0, 1] and rec["ranks_paused"] == [2, 3]


def test_rank_and_one_of_its_buddies(run_cache, run_ok, tmp_path):
    # rank 0's buddies are ranks 1 and 2: rank 2's copy remains
    (rec,) = check(run_cache, run_ok, tmp_path, DEMO, lose((0, 10, "fwd"), (1, 10, "fwd")))
    assert rec["failed"] == [0, 1] and not rec.get("fallback")


def test_faults_while_snapshotting_and_replicating(run_cache, run_ok, tmp_path):
    recs = check(run_cache, run_ok, tmp_path, DEMO,
                 lose((2, 7, "snapshot"), (3, 10, "replication")))
    assert [r["fault_iteration"] for r in recs] == [8, 11]  # detected at the next agreement


@pytest.mark.extended
def test_plain_optimizer(run_cache, run_ok, tmp_path):
    (rec,) = check(run_cache, run_ok, tmp_path, PLAIN, lose((2, 9, "step")))
    assert rec["ranks_replaying"] == [2, 3]


@pytest.mark.extended
def test_sgd_with_momentum(run_cache, run_ok, tmp_path):
    # SGD keeps a momentum buffer per parameter and no step (Megatron's distributed optimizer
    # takes only Adam)
    (rec,) = check(run_cache, run_ok, tmp_path, PLAIN.replace(optimizer="sgd"),
                   lose((1, 9, "bwd")))
    assert rec["ranks_replaying"] == [0, 1]


def test_every_copy_gone_falls_back_to_the_persistent_checkpoint(run_cache, run_ok, tmp_path):
    # one buddy each: rank 0's only buddy is rank 1, so rank 0's windows are gone with it
    recs = check(run_cache, run_ok, tmp_path, DEMO, lose((0, 10, "bwd"), (1, 10, "bwd")),
                 changes={"replication_factor": 1, "save_interval": 4}, max_restarts=1)
    (rec,) = recs
    assert rec["fallback"] and rec["checkpoint_iteration"] == 8 and rec["rollback_iterations"] == 1
    assert "every copy of its window" in rec["reason"]


@pytest.mark.extended
def test_rank_and_both_of_its_buddies_fall_back_bitwise(run_cache, run_ok, tmp_path):
    # r=2: rank 0's buddies are ranks 1 and 2; all three lose their state together
    recs = check(run_cache, run_ok, tmp_path, DEMO,
                 lose((0, 10, "bwd"), (1, 10, "bwd"), (2, 10, "bwd")),
                 changes={"save_interval": 4}, max_restarts=1)
    (rec,) = recs
    assert rec["fallback"] and rec["checkpoint_iteration"] == 8
    assert "every copy of its window" in rec["reason"]


def test_every_copy_gone_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = run_pretrain(DEMO.replace(replication_factor=1, fault_plan=lose(
        (0, 10, "bwd"), (1, 10, "bwd"))), tmp_path, timeout_s=300)
    assert result.returncode != 0
    log = result.log_path.read_text()
    assert "RecoveryError: iteration 10: no window can be recovered in memory: rank 0: every " \
           "copy of its window" in log
    assert "no persistent checkpoint to fall back to" in log


def test_negative_control_stale_operators_fail_the_oracle(run_cache, run_ok, tmp_path):
    out = run_ok(DEMO.replace(fault_plan=lose((1, 9, "bwd"))).with_flags(
        "--moetion-negative-control", "skip_conversion"), tmp_path)
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert not result.identical
    assert "iteration 9" in result.first_difference


def test_survivors_check_catches_a_wrong_replay(tmp_path):
    result = run_pretrain(DEMO.replace(fault_plan=lose((1, 9, "bwd"))).with_flags(
        "--moetion-negative-control", "skip_conversion,keep_checks"), tmp_path, timeout_s=300)
    assert result.returncode != 0
    assert "replay diverged on surviving rank 0" in result.log_path.read_text()
