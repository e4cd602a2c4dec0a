"""Snapshot copies in chunks at quiet points (no all-to-all in flight), on CPU through the
deferring copier that stands in for a CUDA side stream."""

import pytest
import torch

from megatron_moetion.copy_schedule import ChunkedCopies, split_pairs
from megatron_moetion.host_copy import DeferredCopies
from megatron_moetion.snapshot import CaptureItem, SnapshotEngine, WindowLayout


def test_split_pairs_bounds_every_chunk_and_keeps_the_bytes_in_order():
    srcs = [torch.arange(10, dtype=torch.float32), torch.arange(3, dtype=torch.float64),
            torch.arange(7, dtype=torch.bfloat16)]
    dsts = [torch.zeros_like(s) for s in srcs]
    chunks = split_pairs(list(zip(dsts, srcs)), 16)
    assert all(sum(s.numel() * s.element_size() for _, s in c) <= 16 for c in chunks)
    for c in chunks:
        for d, s in c:
            d.copy_(s)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    with pytest.raises(ValueError, match="chunk_bytes"):
        split_pairs([], 0)


class Recorder(DeferredCopies):
    """Logs each launch in the same event list as the schedule's all-to-all brackets."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def launch(self, pairs, keep_alive=()):
        self.events.append("launch")
        return super().launch(pairs, keep_alive)


def _forward(chunks, events, layers=4, micro_batches=2, nested_point=False):
    """One forward pass of a pipeline stage: per layer, attention then the MoE layer."""
    for _ in range(micro_batches):
        for _ in range(layers):
            events.append("attn")
            chunks.quiet_point()
            events.append("a2a_begin")
            chunks.a2a_begin()
            if nested_point:  # a quiet point inside an MoE layer must issue nothing
                chunks.quiet_point()
            chunks.a2a_end()
            events.append("a2a_end")


def _engine(events, chunk_bytes=0):
    engine = SnapshotEngine(torch.device("cpu"), copier=Recorder(events))
    engine.interleave(chunk_bytes)
    weights = [torch.randn(64) for _ in range(4)]
    items = [CaptureItem(f"w{i}", f"op{i}", "active", w) for i, w in enumerate(weights)]
    return engine, weights, items


@pytest.mark.parametrize("nested", [False, True])
def test_chunks_go_out_at_quiet_points_never_inside_an_all_to_all(nested):
    events: list[str] = []
    engine, weights, items = _engine(events)
    win = engine.begin_window(0, 1, WindowLayout.build([items, items]), {})
    engine.capture(win, 0, items, {})  # first iteration: no quiet points seen yet: one chunk
    _forward(engine.chunks, events, nested_point=nested)
    engine.wait_for_copies()
    events.clear()
    expected = [w.clone() for w in weights]
    engine.capture(win, 1, items, {})  # spread over the 8 quiet points of the last iteration
    assert events == [] and engine.chunks.pending == 8
    _forward(engine.chunks, events, nested_point=nested)
    inside = False
    for e in events:
        inside = {"a2a_begin": True, "a2a_end": False}.get(e, inside)
        assert not (inside and e == "launch"), events
    assert events.count("launch") == 8 and engine.chunks.issued_in_a2a == 0
    assert engine.chunks.stats(current=True)["copy_chunks_at_quiet_points"] == 8
    engine.capture(win, 1, items, {})  # the next capture: the stats now describe the last one
    assert engine.chunks.stats() == {"copy_chunks": 8, "copy_chunks_at_quiet_points": 8,
                                     "copy_quiet_points": 8, "copy_chunks_in_a2a": 0}
    for w in weights:
        w.add_(1)  # the next optimizer step runs only after wait_for_copies; checked below
    for w, e in zip(weights, expected):
        w.copy_(e)
    engine.wait_for_copies()
    engine.synchronize()
    for spec, e in zip(win.items(1), expected):
        assert torch.equal(win.view(spec), e)


def test_what_is_left_at_the_deadline_is_issued_then():
    events: list[str] = []
    engine, weights, items = _engine(events, chunk_bytes=64)  # 16 chunks of 64 bytes
    win = engine.begin_window(0, 1, WindowLayout.build([items]), {})
    engine.capture(win, 0, items, {})
    _forward(engine.chunks, events, layers=2, micro_batches=1)  # only 2 quiet points
    assert events.count("launch") == 2 and engine.chunks.pending == 14
    engine.wait_for_copies()  # before the next optimizer step: the rest goes out now
    assert engine.chunks.pending == 0 and engine.chunks.chunks_issued == 16
    engine.synchronize()
    for spec, w in zip(win.items(0), weights):
        assert torch.equal(win.view(spec), w)


def test_a_new_capture_issues_the_previous_one_first():
    chunks = ChunkedCopies(DeferredCopies(), chunk_bytes=8)
    a, b = torch.zeros(4), torch.ones(4)
    chunks.stage([(a, torch.full((4,), 2.0))])
    chunks.stage([(b, torch.full((4,), 3.0))])
    assert chunks.pending == 2  # the first capture's two chunks went out
    chunks.copier.synchronize(chunks.flush())
    assert torch.equal(a, torch.full((4,), 2.0)) and torch.equal(b, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="chunk_bytes"):
        ChunkedCopies(DeferredCopies(), chunk_bytes=-1)


def test_without_a_copier_there_is_nothing_to_interleave():
    assert SnapshotEngine(torch.device("cpu")).interleave() is None
