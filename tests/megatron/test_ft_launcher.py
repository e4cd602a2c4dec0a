"""Under nvidia-resiliency-ext's ``ft_launcher`` with Megatron's ``--enable-ft-package``.

The fault-tolerance package times Megatron's sections ("setup", "step", "checkpointing") in a
rank monitor the launcher runs beside each rank, and terminates a rank whose section outlives
its timeout. A localized recovery runs inside the aborted iteration's training step; MoEtion
closes the "step" section around it (``adapter/ft_sections.py``), so it counts against the
out-of-section timeout instead. The cells give every recovery a length (a test delay) twice the
step timeout: with the section closed the run ends bitwise identical to the fault-free one; the
negative control keeps the recovery inside "step", and the rank monitor must end the rank.
"""

import pytest
from test_process_failures import DEMO

from megatron_moetion.demo.runner import run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

STEP_TIMEOUT_S = 3
FT_ARGS = ("--ft-rank-section-timeouts", f"setup:600,step:{STEP_TIMEOUT_S},checkpointing:600",
           "--ft-rank-out-of-section-timeout", "600", "--ft-workload-check-interval", "0.5",
           "--ft-initial-rank-heartbeat-timeout", "600", "--ft-rank-heartbeat-timeout", "600")
FAULTED = DEMO.replace(fault_plan="rank=1,iter=9,phase=bwd,kind=lose_state", save_interval=4,
                       ft_launcher=FT_ARGS).with_flags(
    "--ft-num-warmup-iters", "2", "--moetion-debug-recovery-delay-s", 2 * STEP_TIMEOUT_S)


def test_a_recovery_longer_than_the_step_timeout_is_not_a_hung_step(run_cache, run_ok,
                                                                     tmp_path):
    out = run_ok(FAULTED, tmp_path)
    log = (out / "log.txt").read_text(errors="replace")
    assert f"step={STEP_TIMEOUT_S:.2f}" in log  # the rank monitors run with this step timeout
    assert "has been open for" not in log
    result = compare_dumps(run_cache.get(DEMO) / "oracle", out / "oracle")
    assert result.identical, result
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    (rec,) = {r["fault_iteration"]: r for r in records
              if r.get("kind") == "recovery" and "ranks_paused" in r}.values()
    assert rec["ranks_replaying"] == [0, 1]  # its seconds leave the test delay out


def test_negative_control_a_recovery_inside_the_step_section_is_ended(patched_megatron,
                                                                      tmp_path):
    cfg = FAULTED.with_flags("--moetion-negative-control", "recovery_in_step_section")
    result = run_pretrain(cfg, tmp_path, timeout_s=300)
    assert result.returncode != 0 and not result.timed_out
    log = (tmp_path / "log.txt").read_text(errors="replace")
    assert "Section 'step' has been open for" in log and "FT timeout elapsed" in log
