"""Megatron-LM's own ``pretrain_gpt.py`` (not in the megatron-core wheel), patched, on CPU.

Runs only where ``MOETION_MEGATRON_LM`` names a Megatron-LM checkout at the pin with the series
applied (``scripts/apply_patches.sh``) and its dataset helpers built (``make -C
megatron/core/datasets``, or the megatron-core wheel's ``helpers_cpp`` copied in); CI has none (no network but the package registries), so
there these cells are skipped. The script runs unchanged through ``testing.cpu_entry``: a lost
state recovered in memory, and a killed middle stage replaced under its ``--inprocess-restart``
(the patched ``maybe_wrap_for_inprocess_restart``), each bitwise identical to the script's own
fault-free run.
"""

import os
from pathlib import Path

import pytest
from test_process_failures import DEMO, PP4, processes_mentioning

from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

CHECKOUT = os.environ.get("MOETION_MEGATRON_LM", "")
pytestmark = [
    pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(600),
    pytest.mark.skipif(not CHECKOUT, reason="MOETION_MEGATRON_LM names no Megatron-LM checkout"),
]


@pytest.fixture(scope="module")
def entry():
    script = Path(CHECKOUT) / "pretrain_gpt.py"
    training = (Path(CHECKOUT) / "megatron" / "training" / "training.py").read_text()
    assert script.exists() and "megatron_hooks" in training, f"{CHECKOUT} is not patched"
    return str(script)


def test_its_parser_takes_the_moetion_flags(entry):
    # the image's build check (Dockerfile), here against the checkout
    import subprocess
    import sys

    code = ("from megatron_moetion.testing import cpu_support; cpu_support.install()\n"
            "import sys; sys.argv = ['pretrain_gpt.py', '--moetion', '--moetion-window', '3']\n"
            "from megatron.training.arguments import parse_args; args = parse_args()\n"
            "assert args.moetion and args.moetion_window == 3\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([CHECKOUT, str(Path(__file__).parents[2])])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def recoveries(out):
    """One recovery record per fault iteration (every rank writes its own)."""
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    return list({r["fault_iteration"]: r for r in records
                 if r.get("kind") == "recovery" and "ranks_paused" in r}.values())


def test_lost_state_recovered_in_memory(run_cache, run_ok, tmp_path, entry):
    base = DEMO.replace(entry=entry)
    out = run_ok(base.replace(fault_plan="rank=1,iter=9,phase=bwd,kind=lose_state"), tmp_path)
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = recoveries(out)
    assert rec["ranks_replaying"] == [0, 1] and rec["ranks_paused"] == [2, 3]


def test_killed_middle_stage_replaced_under_its_inprocess_restart(run_cache, run_ok, tmp_path,
                                                                  entry):
    base = PP4.replace(entry=entry)
    out = run_ok(base.replace(fault_plan="rank=2,iter=10,phase=fwd,kind=kill", save_interval=4,
                              spares=1), tmp_path, timeout_s=400)
    assert processes_mentioning(tmp_path) == []
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = recoveries(out)
    assert rec["failed"] == [2] and rec["ranks_replaying"] == [2]
