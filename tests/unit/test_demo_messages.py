"""The demo's one-line verdict when a run with a dead rank cannot continue."""

from megatron_moetion.demo.__main__ import why_unrecoverable
from megatron_moetion.demo.runner import RunConfig


def test_a_kill_without_spare_or_checkpoint_names_what_would_have_saved_it():
    line = why_unrecoverable(RunConfig(fault_plan="rank=2,iter=7,phase=bwd,kind=kill",
                                       save_interval=10))
    assert line.startswith("rank 2 was killed at iteration 7")
    assert "--spares 1" in line and "checkpoint before iteration 7" in line
    assert "\n" not in line


def test_a_hang_with_a_spare_names_the_checkpoint_only():
    line = why_unrecoverable(RunConfig(fault_plan="rank=1,iter=5,phase=fwd,kind=hang",
                                       save_interval=10, spares=1))
    assert "stopped answering" in line and "--spares" not in line


def test_no_process_death_points_at_the_log():
    assert "log" in why_unrecoverable(RunConfig(fault_plan="rank=1,iter=5,phase=fwd,"
                                                           "kind=lose_state"))
