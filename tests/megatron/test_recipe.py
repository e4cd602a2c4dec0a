"""Recovery on the recipe MoE users train with, bitwise against its fault-free twin.

``RECIPE`` looks like a DeepSeek-V3- or Qwen3-style run, scaled down: bf16 compute weights with
FP32 main weights and the distributed optimizer; an Adam that keeps ``step`` per parameter group
as Transformer Engine's and Apex's FusedAdam do (``testing.group_step_adam``: neither builds on
CPU); attention and hidden dropout 0.1; sigmoid routing with ``--moe-router-enable-expert-bias``
(the router holds an ``expert_bias`` buffer Megatron updates after every step) and the sequence
aux loss; a shared expert; W chosen by Algorithm 1 with the network budget (copy and network
bandwidths and forward-backward time given, so the choice is the same in every run: the first
window has W=1, the later ones W=3, set by the replication of a window to the two buddies over
the node's 0.34 GB/s, while the copy budget alone would take W=1); reorder
thresholds low enough that the popularity order changes at window boundaries.

MTP is not in the recipe: with PP > 1 it is refused at argument validation (Megatron
all-reduces the embedding gradients between the first and last stage when MTP is on, a
coupling a stage-local replay cannot reproduce); tests/megatron/test_refusals.py checks that.

Cells: one rank, both stages, a fault during conversion, a reserve rank replacing a killed rank
(--inprocess-restart).
"""

import pytest
from test_process_failures import DETECT, processes_mentioning

from megatron_moetion.demo.runner import RunConfig
from megatron_moetion.host_copy import DEFERRED_COPIES_ENV
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

RECIPE_FLAGS = (
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
    "--moe-shared-expert-intermediate-size", "64",
    # Algorithm 1 with fixed budgets: copies fit W=1; replication to 2 buddies at 85 MB/s per
    # rank (4 ranks per node) needs W=3 for this model
    "--moetion-copy-bandwidth-gbps", "10", "--moetion-network-bandwidth-gbps", "0.34",
    "--moetion-iter-time-s", "0.02",
    "--moetion-reorder-threshold", "0.01", "--moetion-reorder-fraction", "0.05",
)
RECIPE = RunConfig(train_iters=14, moetion=True, window=0, bf16=True,
                   optimizer="group-step-adam", hidden_dropout=0.1, attention_dropout=0.1,
                   extra_flags=RECIPE_FLAGS)


def lose(*faults):
    return ";".join(f"rank={r},iter={i},phase={p},kind=lose_state" for r, i, p in faults)


def run_and_compare(run_cache, run_ok, tmp_path, cfg, **kwargs):
    out = run_ok(cfg, tmp_path, **kwargs)
    result = compare_dumps(run_cache.get(RECIPE) / "oracle", out / "oracle")
    assert result.identical, result
    return [r for recs in read_metrics(out / "metrics").values() for r in recs]


def recoveries(records, rank=0):
    return [r for r in records if r.get("kind") == "recovery" and r["rank"] == rank
            and "ranks_paused" in r]


def test_recipe_windows_change_size_and_order(run_cache):
    """What the recipe is meant to exercise happens in it: W from Algorithm 1 (1, then 3, set
    by the network budget),
    a reorder of the operators, router expert bias that changes during training."""
    records = read_metrics(run_cache.get(RECIPE) / "metrics")[0]
    opened = [(r["iteration"], r["window_opened"]) for r in records if "window_opened" in r]
    assert [o["size"] for _, o in opened][:3] == [1, 3, 3], opened
    later = [r for r in records if r["iteration"] > 3 and "window_binding" in r]
    assert later and all(r["window_binding"] == "network" and r["window_copy_only"] == 1
                         and r["replication_window_s"] <= r["replication_budget_s"]
                         for r in later), later[-1]
    assert any(o["reordered"] for it, o in opened[1:] if it < 10), opened
    import torch

    state = torch.load(run_cache.get(RECIPE) / "oracle" / "rank0.state.pt", weights_only=True)
    bias = [v for k, v in state["tensors"].items() if k.endswith("expert_bias")]
    assert bias and any(b.abs().sum() > 0 for b in bias)


def test_recipe_single_rank(run_cache, run_ok, tmp_path):
    """Also the GPU copy path on CPU: copies deferred as on a side stream, issued in chunks at
    the attention blocks of the next forward (never inside an MoE layer's all-to-all); the run
    still ends bitwise identical to its fault-free twin, which copied synchronously."""
    records = run_and_compare(run_cache, run_ok, tmp_path,
                              RECIPE.replace(fault_plan=lose((1, 10, "bwd"))),
                              env={DEFERRED_COPIES_ENV: "1"})
    (rec,) = recoveries(records)
    assert rec["ranks_replaying"] == [0, 1] and rec["ranks_paused"] == [2, 3]
    assert rec["conversion_iterations"] >= 1  # a W=3 window, not the W=1 one
    steps = [r for r in records if r.get("copy_quiet_points")]
    assert steps and all(r["copy_chunks_in_a2a"] == 0 for r in steps)
    assert any(r["copy_chunks_at_quiet_points"] > 1 for r in steps), steps[-1]


def test_recipe_both_stages(run_cache, run_ok, tmp_path):
    records = run_and_compare(run_cache, run_ok, tmp_path,
                              RECIPE.replace(fault_plan=lose((0, 10, "step"), (3, 10, "fwd"))))
    (rec,) = recoveries(records)
    assert rec["failed"] == [0, 3] and rec["ranks_replaying"] == [0, 1, 2, 3]


def test_recipe_fault_during_conversion(run_cache, run_ok, tmp_path):
    records = run_and_compare(run_cache, run_ok, tmp_path, RECIPE.replace(
        fault_plan=lose((1, 10, "bwd"), (0, 10, "recovery"))))
    (rec,) = recoveries(records)
    assert rec["attempts"] == 2 and rec["failed"] == [0, 1]


def test_recipe_spare_replaces_a_killed_rank(run_cache, run_ok, tmp_path):
    # --save keeps the record of fired faults, so the spare does not fire the kill again
    cfg = RECIPE.replace(fault_plan="rank=2,iter=10,phase=fwd,kind=kill", spares=1,
                         save_interval=4, extra_flags=RECIPE_FLAGS + DETECT)
    records = run_and_compare(run_cache, run_ok, tmp_path, cfg)
    assert processes_mentioning(tmp_path) == []
    assert not [r for r in records if r.get("kind") == "restart"]  # no global rollback
    (replaced,) = [r for r in records if r.get("cause") == "process_failure" and r["rank"] == 0]
    assert replaced["replaced_by"] == {"2": 4}
    (rec,) = recoveries(records)
    assert rec["ranks_replaying"] == [2, 3] and rec["ranks_paused"] == [0, 1]
