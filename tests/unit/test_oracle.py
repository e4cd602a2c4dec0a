"""The oracle itself: identical dumps compare equal, and a one-ULP change is caught and named."""

import math

import torch

from megatron_moetion.oracle import OracleRecorder, compare_dumps, load_dump, losses_by_iteration


def make_dump(root, *, bump=None, loss_bump=False):
    gen = torch.Generator().manual_seed(0)
    for rank in range(2):
        rec = OracleRecorder(root, rank)
        for it in (1, 2, 3):
            loss = 4.0 + it / 7
            if loss_bump and rank == 1 and it == 2:
                loss = math.nextafter(loss, math.inf)
            rec.record_iteration(it, {"lm loss": loss} if rank == 1 else {}, 1.5 + it, 0)
        tensors = {"param/w": torch.randn(8, 4, generator=gen),
                   "optim0/w/exp_avg": torch.randn(32, generator=gen),
                   "optim0/w/step": torch.tensor(3.0, dtype=torch.float64)}
        if bump is not None and bump[0] == rank:
            t = tensors[bump[1]].view(-1)
            t[5] = torch.nextafter(t[5], torch.tensor(math.inf))
        rec.dump_state(tensors)
    return root


def test_identical_dumps(tmp_path):
    result = compare_dumps(make_dump(tmp_path / "a"), make_dump(tmp_path / "b"))
    assert result.identical, result
    assert (result.ranks, result.iterations, result.tensors) == (2, 6, 6)


def test_one_ulp_in_a_tensor_is_caught_and_named(tmp_path):
    result = compare_dumps(make_dump(tmp_path / "a"),
                           make_dump(tmp_path / "b", bump=(1, "optim0/w/exp_avg")))
    assert not result.identical
    assert result.first_difference.startswith("rank 1, tensor optim0/w/exp_avg: 1 of 32 elements")
    assert "first at flat index 5" in result.first_difference


def test_one_ulp_in_a_loss_is_caught_and_named(tmp_path):
    result = compare_dumps(make_dump(tmp_path / "a"), make_dump(tmp_path / "b", loss_bump=True))
    assert not result.identical
    assert result.first_difference.startswith("rank 1, iteration 2: losses")


def test_a_replayed_iteration_keeps_its_last_record(tmp_path):
    rec = OracleRecorder(tmp_path, 0)
    rec.record_iteration(1, {"lm loss": 9.0}, None, 0)
    rec.record_iteration(1, {"lm loss": 4.5}, None, 0)
    assert losses_by_iteration(load_dump(tmp_path)) == {1: 4.5}


def test_missing_rank_is_a_difference(tmp_path):
    a = make_dump(tmp_path / "a")
    b = make_dump(tmp_path / "b")
    (b / "rank1.state.pt").unlink()
    (b / "rank1.iterations.jsonl").unlink()
    assert "ranks differ" in compare_dumps(a, b).first_difference
