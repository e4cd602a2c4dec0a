"""The oracle on real Megatron-Core runs: its dump holds everything a rank holds, and a recovery
that leaves state the old oracle never looked at (RNG streams, router buffers) fails it, naming
the field. Two runs in all: the fault-free twin (cached) and one run with a fault whose
recovery skips two restores.

PP=4 with one rank per stage: only the failed rank replays, so the survivors' own self-check
(which compares RNG and router buffers of a surviving replaying rank) does not stop the run
first. Sigmoid routing with expert bias gives each router an ``expert_bias`` and a
non-persistent ``local_tokens_per_expert`` buffer. Nothing draws random numbers in this model
(dropout 0), so an RNG stream left wrong changes nothing but the RNG state itself: only the
new oracle can see it.
"""

import re

import pytest

from megatron_moetion.demo.runner import RunConfig
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import RankDump, compare_dumps, load_dump

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(300)]

BIAS = RunConfig(train_iters=12, moetion=True, window=3, pp=4, dp=1, ep=1, extra_flags=(
    "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"))
ROUTER = "buffer/chunk0.decoder.layers.0.mlp.router"
STREAMS = ("data-parallel-rng", "expert-parallel-rng", "model-parallel-rng")
SAMPLES_PER_ITER = BIAS.global_batch_size


def test_dump_holds_everything_every_rank_holds(run_cache):
    dumps = load_dump(run_cache.get(BIAS) / "oracle")
    assert sorted(dumps) == [0, 1, 2, 3]
    for rank, d in dumps.items():
        assert sorted(d.iterations) == list(range(1, 13))
        assert sorted(d.states) == [4, 8, 12] and d.final is not None
        for it, state in [*d.states.items(), (12, d.final)]:
            t, s = state.tensors, state.scalars
            assert {n.split("/")[0] for n in t} == {"param", "optim0", "buffer", "rng"}
            assert {f"{ROUTER}.expert_bias", f"{ROUTER}.local_tokens_per_expert"} <= set(t)
            assert {"rng/cpu", "rng/python", "rng/numpy",
                    *(f"rng/tracker/{n}" for n in STREAMS)} <= set(t)
            assert any(n.endswith("/exp_avg_sq") for n in t)
            for field in ("lr", "weight_decay", "betas", "eps", "wd_mult", "num_params"):
                assert f"optim0/group0/{field}" in s, field
            assert len(s["optim0/group0/betas"]) == 2
            assert s["scheduler/num_steps"] == it * SAMPLES_PER_ITER
            assert s["scheduler/lr_decay_style"] == "cosine"
            assert s["consumed_train_samples"] == it * SAMPLES_PER_ITER
            assert s["loss_scale"] == (1.0).hex() and s["grad_scaler/optim0"] is None
        # the state after the last iteration is the final state
        assert compare_dumps({rank: RankDump(rank, final=d.states[12])},
                             {rank: RankDump(rank, final=d.final)}, check_iterations=False).identical
        # the routers' aux loss, per layer: this stage's own layer only (one layer per stage)
        aux = d.iterations[5]["moe"]["load_balancing_loss"]
        assert len(aux) == 4 and [float.fromhex(x) != 0 for x in aux] == [
            i == rank for i in range(4)]
        assert bool(d.iterations[5]["losses"]) == (rank == 3)  # lm loss: the last stage
        assert d.iterations[5]["grad_norm"] is not None and d.iterations[5]["skipped"] == 0


def test_rng_and_router_buffers_left_unrestored_fail_the_oracle(run_cache, run_ok, tmp_path):
    out = run_ok(BIAS.replace(fault_plan="rank=1,iter=10,phase=bwd,kind=lose_state").with_flags(
        "--moetion-negative-control", "skip_rng_restore,skip_buffer_restore"), tmp_path)
    (rec,) = [r for recs in read_metrics(out / "metrics").values() for r in recs
              if r.get("kind") == "recovery" and r["rank"] == 0]
    assert rec["ranks_replaying"] == [1] and rec["replayed_iterations"] >= 1
    result = compare_dumps(run_cache.get(BIAS) / "oracle", out / "oracle")
    assert not result.identical
    message = str(result)
    # (a) RNG not restored: every stream of the failed rank, and only there (the paused ranks
    # reset theirs); compute does not draw from them, so nothing else betrays it
    for name in ("rng/cpu", *(f"rng/tracker/{n}" for n in STREAMS)):
        assert name in message, (name, message)
        assert f"rank 1, state at iteration 12, {name}: " in "\n".join(result.differences)
    rng = [d for d in result.differences if ", rng/" in d]
    assert {d.split(",")[0] for d in rng} == {"rank 1"}, rng
    # (b) router buffers not restored: the failed rank's expert bias (the damage then spreads
    # through routing to the other stages, and to losses and weights)
    assert f"{ROUTER}.expert_bias" in message
    assert any(d.startswith(f"rank 1, state at iteration 12, {ROUTER}.expert_bias: ")
               for d in result.differences)
    # the first difference is the first iteration after the failure
    assert result.first_difference.startswith("rank 0, iteration 10: grad_norm ")


# An Adam that keeps its step per parameter group, as FusedAdam does (testing/group_step_adam.py);
# two layers per stage: a frozen expert of the second layer feeds the input gradient of the first
# layer's operators while the failed stage converts (with one layer per stage a wrong frozen
# weight changes only gradients that conversion discards, and the run stays bitwise identical)
GROUP_STEP = BIAS.replace(optimizer="group-step-adam", num_layers=8)


@pytest.mark.parametrize("control, named", [
    pytest.param("group_step_off_by_one", "rank 1, state at iteration 12, optim0/group0/step: ",
                 marks=pytest.mark.extended),
    ("flip_frozen_ulp", "rank 1, state at iteration 12, "),
], ids=["group_step_off_by_one", "one_ulp_in_a_frozen_expert"])
def test_group_step_and_frozen_weight_errors_fail_the_oracle(run_cache, run_ok, tmp_path,
                                                             control, named):
    out = run_ok(GROUP_STEP.replace(fault_plan="rank=1,iter=10,phase=bwd,kind=lose_state")
                 .with_flags("--moetion-negative-control", control), tmp_path)
    result = compare_dumps(run_cache.get(GROUP_STEP) / "oracle", out / "oracle")
    assert not result.identical
    assert any(d.startswith(named) for d in result.differences), result.differences[:5]
    # nothing before the failure differs
    first = re.search(r"iteration (\d+)", result.first_difference)
    assert first and int(first.group(1)) >= 10, result.first_difference
