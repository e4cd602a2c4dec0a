"""The oracle itself: identical dumps compare equal; a one-bit change in any kind of state, and
any dump that cannot show identity, is caught and named (rank, snapshot, field)."""

import math

import pytest
import torch

from megatron_moetion.oracle import (
    OracleRecorder,
    compare_dumps,
    exact,
    load_dump,
    losses_by_iteration,
)

EXPERT0 = "chunk0.decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
EXPERT1 = "chunk0.decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
ROUTER = "chunk0.decoder.layers.1.mlp.router"
ITERS, INTERVAL = 8, 4


def rank_state(rank: int, it: int) -> tuple[dict, dict]:
    """A rank's synthetic state after iteration ``it`` (``it`` = ITERS + 1: the final one):
    every kind the real dump has, values that change with the iteration."""
    gen = torch.Generator().manual_seed(1000 * rank + it)
    tensors = {}
    for name in (EXPERT0, EXPERT1):
        tensors[f"param/{name}"] = torch.randn(8, 4, generator=gen)
        base = f"optim1/{name}[0:32]"
        tensors[f"{base}/main"] = torch.randn(32, generator=gen)
        tensors[f"{base}/exp_avg"] = torch.randn(32, generator=gen)
        tensors[f"{base}/exp_avg_sq"] = torch.rand(32, generator=gen)
        tensors[f"{base}/step"] = torch.tensor(float(min(it, ITERS)))
    tensors[f"buffer/{ROUTER}.expert_bias"] = torch.randn(8, generator=gen)
    tensors[f"buffer/{ROUTER}.local_tokens_per_expert"] = torch.zeros(8)
    rng = torch.Generator().manual_seed(7 + rank)
    tensors["rng/cpu"] = rng.get_state()
    tensors["rng/tracker/model-parallel-rng"] = torch.Generator().manual_seed(9).get_state()
    scalars = {"optim0/group0/lr": 1e-3 * 0.9 ** it, "optim0/group0/weight_decay": 0.01,
               "optim0/group0/betas": (0.9, 0.999), "optim0/group0/eps": 1e-8,
               "optim0/group0/step": min(it, ITERS), "optim0/group0/num_params": 2,
               "optim0/group0/default_config": True,
               "scheduler/num_steps": 8 * min(it, ITERS), "scheduler/lr_decay_style": "cosine",
               "grad_scaler/optim0": None, "loss_scale": 1.0,
               "consumed_train_samples": 8 * min(it, ITERS)}
    return tensors, scalars


def make_dump(root, *, change=None, loss_bump=False, aux_bump=False, skip_state=()):
    """A 2-rank dump; ``change(rank, label, tensors, scalars)`` may alter one state
    (``label``: the iteration, or "final")."""
    for rank in range(2):
        rec = OracleRecorder(root, rank, interval=INTERVAL)
        for it in range(1, ITERS + 1):
            loss = 4.0 + it / 7
            if loss_bump and rank == 1 and it == 2:
                loss = math.nextafter(loss, math.inf)
            aux = [0.25 + it / 64, 0.5]
            if aux_bump and rank == 0 and it == 3:
                aux[1] = math.nextafter(aux[1], math.inf)
            rec.record_iteration(it, {"lm loss": loss} if rank == 1 else {}, 1.5 + it, 0,
                                 metrics={"moe": {"load_balancing_loss": aux}, "mtp": {}})
            if rec.wants_state(it) and (rank, it) not in skip_state:
                tensors, scalars = rank_state(rank, it)
                if change is not None:
                    change(rank, it, tensors, scalars)
                rec.dump_state(tensors, scalars, iteration=it)
        if (rank, "final") not in skip_state:
            tensors, scalars = rank_state(rank, ITERS + 1)
            if change is not None:
                change(rank, "final", tensors, scalars)
            rec.dump_state(tensors, scalars, meta={"last_checkpoint_save": None})
    return root


def ulp(t: torch.Tensor, index: int = 5) -> None:
    flat = t.view(-1)
    flat[index] = torch.nextafter(flat[index], torch.tensor(math.inf, dtype=flat.dtype))


def at(rank, label, fn):
    def change(r, lab, tensors, scalars):
        if (r, lab) == (rank, label):
            fn(tensors, scalars)
    return change


def different(tmp_path, **kwargs):
    result = compare_dumps(make_dump(tmp_path / "a"), make_dump(tmp_path / "b", **kwargs))
    assert not result.identical
    assert str(result).startswith("DIFFERENT: ")
    return result


def test_identical_dumps(tmp_path):
    result = compare_dumps(make_dump(tmp_path / "a"), make_dump(tmp_path / "b"))
    assert result.identical, result
    per_state_tensors, per_state_scalars = (len(x) for x in rank_state(0, 1))
    assert (result.ranks, result.iterations, result.snapshots) == (2, 2 * ITERS, 2 * 3)
    assert result.tensors == 2 * 3 * per_state_tensors
    assert result.scalars == 2 * 3 * per_state_scalars
    assert result.elements > 0 and result.differences == [] and result.fields == []
    assert str(result) == (
        f"bitwise identical: 2 ranks, 16 iteration records, 6 state snapshots, "
        f"{result.tensors} tensors ({result.elements} elements), {result.scalars} scalar fields")
    assert result.summary()["state_snapshots"] == 6


def test_dump_files_and_round_trip(tmp_path):
    make_dump(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["rank0.iterations.jsonl", "rank0.state.iter0000004.pt",
                     "rank0.state.iter0000008.pt", "rank0.state.pt",
                     "rank1.iterations.jsonl", "rank1.state.iter0000004.pt",
                     "rank1.state.iter0000008.pt", "rank1.state.pt"]
    dumps = load_dump(tmp_path)
    assert sorted(dumps[1].states) == [4, 8]
    assert dumps[1].final.scalars["optim0/group0/betas"] == [(0.9).hex(), (0.999).hex()]
    assert dumps[1].final.scalars["scheduler/lr_decay_style"] == "cosine"
    assert dumps[1].final.scalars["grad_scaler/optim0"] is None
    assert dumps[1].tensors is dumps[1].final.tensors
    assert dumps[0].iterations[3]["moe"]["load_balancing_loss"][0] == (0.25 + 3 / 64).hex()


def test_exact_encoding():
    assert exact(0.1) == (0.1).hex() and exact(3) == 3 and exact(True) is True
    assert exact((0.9, (1, None))) == [(0.9).hex(), [1, None]]
    assert exact({"b": 1.5, "a": "x"}) == {"a": "x", "b": (1.5).hex()}
    assert exact(torch.tensor([1.0]))["bytes"] == "0000803f"
    assert exact(object()) == "<builtins.object>"  # no address: equal objects of a type


# -- negative controls: each one-bit change is caught, and the message names the field ------

def test_one_ulp_in_a_tensor_is_caught_and_named(tmp_path):
    result = different(tmp_path, change=at(1, "final", lambda t, s: ulp(
        t[f"optim1/{EXPERT0}[0:32]/exp_avg"])))
    assert result.first_difference.startswith(
        f"rank 1, final, optim1/{EXPERT0}[0:32]/exp_avg: 1 of 32 elements")
    assert "first at flat index 5" in result.first_difference
    assert len(result.differences) == 1


def test_one_ulp_in_a_loss_is_caught_and_named(tmp_path):
    result = different(tmp_path, loss_bump=True)
    assert result.first_difference.startswith("rank 1, iteration 2: losses/lm loss ")
    assert result.fields == ["iteration/losses/lm loss"]


def test_one_ulp_in_a_moe_aux_loss_is_caught_and_named(tmp_path):
    result = different(tmp_path, aux_bump=True)
    assert result.first_difference.startswith(
        "rank 0, iteration 3: moe/load_balancing_loss 1 of 2 values differ; first at index 1")


def test_control_rng_not_restored(tmp_path):
    def stale_rng(tensors, scalars):
        tensors["rng/cpu"] = torch.Generator().manual_seed(0xDEAD).get_state()
        tensors["rng/tracker/model-parallel-rng"] = tensors["rng/cpu"].clone()

    result = different(tmp_path, change=at(1, 8, stale_rng))
    assert result.first_difference.startswith("rank 1, state at iteration 8, rng/cpu: ")
    assert result.fields == ["rng/cpu", "rng/tracker/model-parallel-rng"]
    assert "rng/tracker/model-parallel-rng" in str(result)


def test_control_router_buffer_not_restored(tmp_path):
    result = different(tmp_path, change=at(0, 4, lambda t, s: ulp(
        t[f"buffer/{ROUTER}.expert_bias"], 2)))
    assert result.first_difference.startswith(
        f"rank 0, state at iteration 4, buffer/{ROUTER}.expert_bias: 1 of 8 elements differ; "
        f"first at flat index 2")


def test_control_one_ulp_in_a_frozen_experts_compute_weight(tmp_path):
    result = different(tmp_path, change=at(1, 4, lambda t, s: ulp(t[f"param/{EXPERT1}"], 17)))
    assert result.first_difference.startswith(
        f"rank 1, state at iteration 4, param/{EXPERT1}: 1 of 32 elements differ; first at "
        f"flat index 17")


def test_control_group_step_off_by_one(tmp_path):
    def off_by_one(tensors, scalars):
        scalars["optim0/group0/step"] += 1

    result = different(tmp_path, change=at(0, "final", off_by_one))
    assert result.differences == ["rank 0, final, optim0/group0/step: 8 vs 9"]


def test_control_stale_expert(tmp_path):
    """MoC-style: expert 1 of rank 1 resumed from the state of an older window."""
    def stale(tensors, scalars):
        old, _ = rank_state(1, 4)
        for name in [n for n in tensors if EXPERT1 in n]:
            tensors[name] = old[name]

    result = different(tmp_path, change=at(1, 8, stale))
    stale_fields = [f"optim1/{EXPERT1}[0:32]/{k}" for k in ("exp_avg", "exp_avg_sq", "main",
                                                              "step")] + [f"param/{EXPERT1}"]
    assert result.fields == stale_fields
    assert all(d.startswith("rank 1, state at iteration 8, ") for d in result.differences)
    assert all(name in str(result) for name in stale_fields)
    assert (f"rank 1, state at iteration 8, optim1/{EXPERT1}[0:32]/step: 1 of 1 elements "
            f"differ; first at flat index 0 (8.0 vs 4.0); max |a-b| = 4.000e+00"
            ) in result.differences


@pytest.mark.parametrize("name, value", [
    ("scheduler/num_steps", 65), ("loss_scale", 2.0), ("consumed_train_samples", 72),
    ("optim0/group0/lr", math.nextafter(1e-3 * 0.9 ** 8, 1.0)),
    ("optim0/group0/betas", (0.9, 0.998))])
def test_every_scalar_kind_is_compared(tmp_path, name, value):
    def change(tensors, scalars):
        scalars[name] = value

    result = different(tmp_path, change=at(1, 8, change))
    assert result.fields == [name]
    assert result.first_difference.startswith(f"rank 1, state at iteration 8, {name}: ")


# -- dumps that cannot show identity are errors, never "identical" ---------------------------

def test_dumps_without_any_state_are_not_identical(tmp_path):
    for side in ("a", "b"):
        rec = OracleRecorder(tmp_path / side, 0, interval=0)
        rec.record_iteration(1, {"lm loss": 1.0}, 1.0, 0)
        rec.dump_state({})
    result = compare_dumps(tmp_path / "a", tmp_path / "b")
    assert not result.identical
    assert "no state tensors to compare" in str(result)


def test_empty_or_missing_dumps_are_not_identical(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert "no rank records found" in str(compare_dumps(tmp_path / "a", tmp_path / "b"))
    result = compare_dumps(tmp_path / "a", tmp_path / "nonexistent")
    assert not result.identical and "no such directory" in str(result)


def test_missing_rank_is_a_difference(tmp_path):
    a = make_dump(tmp_path / "a")
    b = make_dump(tmp_path / "b")
    for path in b.glob("rank1.*"):
        path.unlink()
    result = compare_dumps(a, b)
    assert not result.identical and "ranks differ: [0, 1] vs [0]" in result.first_difference


def test_rank_without_its_final_state_file_is_a_difference(tmp_path):
    result = different(tmp_path, skip_state=[(1, "final")])
    assert result.first_difference == "rank 1: no final state file (rank1.state.pt) in dump b"


def test_missing_state_snapshot_is_a_difference(tmp_path):
    result = different(tmp_path, skip_state=[(0, 4)])
    assert result.first_difference.startswith(
        "rank 0: state snapshots (iterations) differ: 2 vs 1 (only in a: [4]")


def test_mismatched_record_counts_are_a_difference(tmp_path):
    a, b = make_dump(tmp_path / "a"), make_dump(tmp_path / "b")
    rec = OracleRecorder(b, 0, interval=INTERVAL)
    rec.record_iteration(ITERS + 1, {}, 1.0, 0)
    result = compare_dumps(a, b)
    assert not result.identical
    assert result.first_difference.startswith("rank 0: iteration records differ: 8 vs 9")


def test_mismatched_field_sets_are_a_difference(tmp_path):
    def extra_tensor(tensors, scalars):
        tensors[f"buffer/{ROUTER}.extra"] = torch.zeros(2)
        del scalars["loss_scale"]

    result = different(tmp_path, change=at(1, "final", extra_tensor))
    assert result.differences == [
        "rank 1, final: scalar fields differ: 12 vs 11 (only in a: ['loss_scale'], only in b: "
        "[])",
        f"rank 1, final: tensor names differ: 14 vs 15 (only in a: [], only in b: "
        f"['buffer/{ROUTER}.extra'])"]
    assert f"fields: loss_scale, buffer/{ROUTER}.extra" in str(result)


def test_mismatched_record_fields_are_a_difference(tmp_path):
    a, b = make_dump(tmp_path / "a"), tmp_path / "b"
    for rank in range(2):
        rec = OracleRecorder(b, rank, interval=INTERVAL)
        for it in range(1, ITERS + 1):
            rec.record_iteration(it, {"lm loss": 4.0 + it / 7} if rank == 1 else {}, 1.5 + it, 0)
            if rec.wants_state(it):
                rec.dump_state(*rank_state(rank, it), iteration=it)
        rec.dump_state(*rank_state(rank, ITERS + 1))
    result = compare_dumps(a, b)
    assert not result.identical
    assert result.first_difference.startswith(
        "rank 0, iteration 1: record fields differ: 3 vs 2 (only in a: "
        "['moe/load_balancing_loss']")
    assert "iteration/moe/load_balancing_loss" in result.fields


# -- replays -----------------------------------------------------------------------------------

def test_a_replayed_iteration_keeps_its_last_record(tmp_path):
    rec = OracleRecorder(tmp_path, 0)
    rec.record_iteration(1, {"lm loss": 9.0}, None, 0)
    rec.record_iteration(1, {"lm loss": 4.5}, None, 0)
    assert losses_by_iteration(load_dump(tmp_path)) == {1: 4.5}


def test_a_replayed_iteration_keeps_its_last_state(tmp_path):
    rec = OracleRecorder(tmp_path, 0, interval=4)
    assert [t for t in range(1, 13) if rec.wants_state(t)] == [4, 8, 12]
    rec.dump_state({"param/w": torch.zeros(2)}, {"consumed_train_samples": 1}, iteration=4)
    rec.dump_state({"param/w": torch.ones(2)}, {"consumed_train_samples": 2}, iteration=4)
    state = load_dump(tmp_path)[0].states[4]
    assert torch.equal(state.tensors["param/w"], torch.ones(2))
    assert state.scalars == {"consumed_train_samples": 2}
    assert not list(tmp_path.glob("*.tmp"))


def test_interval_is_a_count_of_iterations(tmp_path):
    assert OracleRecorder(tmp_path, 0, 3).wants_state(6)
    assert not OracleRecorder(tmp_path, 0, 3).wants_state(4)
    assert not OracleRecorder(tmp_path, 0, 0).wants_state(4)
    with pytest.raises(ValueError, match="--moetion-oracle-interval"):
        OracleRecorder(tmp_path, 0, -1)
