"""The determinism oracle on real Megatron-Core: same seed gives bitwise-identical runs, and the
comparison catches a one-ULP change in a real dump."""

import math
import shutil

import pytest
import torch

from megatron_moetion.demo.runner import RunConfig
from megatron_moetion.oracle import compare_dumps, load_dump

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

BASE = RunConfig(train_iters=5)


def test_two_runs_with_the_same_seed_are_bitwise_identical(run_cache, run_ok, tmp_path):
    first = run_cache.get(BASE)
    second = run_ok(BASE, tmp_path / "again")
    result = compare_dumps(first / "oracle", second / "oracle")
    assert result.identical, result
    assert result.ranks == 4 and result.iterations == 4 * 5 and result.tensors > 600
    assert result.snapshots == 4 * 2 and result.scalars > 100  # state after iteration 4, final


def test_oracle_catches_one_ulp_in_a_real_dump(run_cache, tmp_path):
    original = run_cache.get(BASE) / "oracle"
    copy = tmp_path / "perturbed"
    shutil.copytree(original, copy)
    payload = torch.load(copy / "rank2.state.pt", weights_only=True)
    name = sorted(n for n in payload["tensors"] if "exp_avg_sq" in n)[0]
    flat = payload["tensors"][name].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf, dtype=flat.dtype))
    torch.save(payload, copy / "rank2.state.pt")
    result = compare_dumps(original, copy)
    assert not result.identical
    assert result.first_difference.startswith(f"rank 2, final, {name}: 1 of ")
    assert result.differences == [result.first_difference] and result.fields == [name]


def test_dump_holds_losses_grad_norms_params_and_optimizer_state(run_cache):
    dumps = load_dump(run_cache.get(BASE) / "oracle")
    last_stage = [d for d in dumps.values() if d.iterations[1]["losses"]]
    assert {d.rank for d in last_stage} == {2, 3}  # PP=2: ranks 2, 3 hold the last stage
    assert all(d.iterations[5]["grad_norm"] is not None for d in dumps.values())
    for d in dumps.values():
        assert sorted(d.states) == [4]  # every 4th iteration, and the final state
        kinds = {n.split("/")[0] for n in d.tensors}
        # dense and expert optimizers; RNG streams (this model has no buffers)
        assert kinds == {"param", "optim0", "optim1", "rng"}, kinds
        assert any(n.endswith("/exp_avg_sq") for n in d.tensors)
        assert d.scalars["scheduler/num_steps"] == d.scalars["consumed_train_samples"] == 5 * 8
        assert {"optim0/group0/lr", "optim1/group0/lr", "loss_scale"} <= set(d.scalars)
        assert d.iterations[5]["moe"]["load_balancing_loss"]  # the routers' aux loss
