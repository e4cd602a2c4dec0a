"""The asynchronous (GPU) copy paths, run on CPU through an injected copier that defers every
copy until the engine or the logs wait for it, as a CUDA side stream would run it later."""

import types

import pytest
import torch

from megatron_moetion.host_copy import DeferredCopies, SideStreamCopies
from megatron_moetion.snapshot import CaptureItem, SnapshotEngine, WindowLayout
from megatron_moetion.upstream_log import LogStore


def _items():
    weight = torch.arange(8, dtype=torch.float32)  # written only by the optimizer step
    bias = torch.full((4,), 1.5)  # a router buffer: written by the next backward
    counts = torch.zeros(4)  # token counters: accumulated by the next forward
    items = [CaptureItem("w", "op", "active", weight),
             CaptureItem("buffer/expert_bias", "op", "active", bias, written_outside_step=True),
             CaptureItem("buffer/tokens", "op", "active", counts, written_outside_step=True)]
    return weight, bias, counts, items


def test_cpu_engine_copies_synchronously_without_a_copier():
    engine = SnapshotEngine(torch.device("cpu"))
    assert engine.copier is None
    weight, bias, _, items = _items()
    win = engine.begin_window(0, 5, WindowLayout.build([items]), {})
    engine.capture(win, 0, items, {})
    weight.add_(1)
    assert torch.equal(win.view(win.items(0)[0]), torch.arange(8, dtype=torch.float32))


def test_buffers_written_outside_the_step_are_snapshotted_before_capture_returns():
    copier = DeferredCopies()
    engine = SnapshotEngine(torch.device("cpu"), copier=copier)
    weight, bias, counts, items = _items()
    win = engine.begin_window(0, 5, WindowLayout.build([items]), {})
    engine.capture(win, 0, items, {"iteration": 5})
    assert copier.pending == 1  # nothing copied yet: the copies run "on the side stream"
    # the next forward and backward run before the copies: counters grow, expert_bias moves
    counts.add_(7)
    bias.mul_(2)
    engine.wait_for_copies()  # before the next optimizer step
    assert copier.pending == 0
    w_spec, b_spec, c_spec = win.items(0)
    assert torch.equal(win.view(b_spec), torch.full((4,), 1.5))  # as of the capture
    assert torch.equal(win.view(c_spec), torch.zeros(4))
    # the staged clones are what the copies read, kept alive for them
    assert len(copier.kept_alive) == 2
    # an item written only by the optimizer step is copied when the copy runs: correct only
    # because wait_for_copies precedes the next step (the contract the flag exists for)
    assert torch.equal(win.view(w_spec), weight)


def test_without_the_flag_a_buffer_would_be_torn():
    """The negative control: the same buffer unmarked is read after the next backward wrote it."""
    copier = DeferredCopies()
    engine = SnapshotEngine(torch.device("cpu"), copier=copier)
    bias = torch.full((4,), 1.5)
    items = [CaptureItem("buffer/expert_bias", "op", "active", bias)]
    win = engine.begin_window(0, 5, WindowLayout.build([items]), {})
    engine.capture(win, 0, items, {})
    bias.mul_(2)
    engine.wait_for_copies()
    assert torch.equal(win.view(win.items(0)[0]), torch.full((4,), 3.0))


def test_seal_and_release_wait_for_pending_copies():
    copier = DeferredCopies()
    engine = SnapshotEngine(torch.device("cpu"), copier=copier)
    _, _, _, items = _items()
    win = engine.begin_window(0, 5, WindowLayout.build([items]), {})
    engine.capture(win, 0, items, {})
    engine.seal(win)  # the replication thread reads the bytes next
    assert copier.pending == 0 and copier.syncs == 1
    win2 = engine.begin_window(1, 6, WindowLayout.build([items]), {})
    engine.capture(win2, 0, items, {})
    engine.release(win2)  # e.g. lose_state: the buffer goes back to the pool
    assert copier.pending == 0
    assert engine.wait_for_copies() == 0.0  # nothing left to order


def test_build_captures_marks_router_buffers(monkeypatch):
    from megatron_moetion.adapter import capture
    from megatron_moetion.adapter.discovery import OperatorBinding
    from megatron_moetion.operators import OpKind

    monkeypatch.setattr(capture, "main_states", lambda optimizer: iter(()))
    binding = OperatorBinding("layer0.router", OpKind.ROUTER, 0, None,
                              buffers=[("expert_bias", torch.zeros(4)),
                                       ("local_tokens_per_expert", torch.zeros(4))])
    (cap,) = capture.build_captures([binding], optimizer=None)
    items = [item for item, _ in cap.active + cap.frozen]
    assert len(items) == 4 and all(item.written_outside_step for item in items)


# ------------------------------------------------------------------ upstream logs

def _logged(copier):
    logs = LogStore(torch.device("cpu"), copier=copier)
    act = torch.arange(6, dtype=torch.float32)
    logs.log_send((3, 0, 0, "fwd"), act)
    logs.log_data(3, 0, {"tokens": torch.tensor([1, 2])})
    logs.log_record(3, {"grad_norm": 1.0})
    return logs, act


READERS = {
    "export": lambda logs: logs.export("fwd", [3]),
    "boundary": lambda logs: logs.boundary,
    "data": lambda logs: logs.data,
    "records": lambda logs: logs.records,
    "data_for": lambda logs: logs.data_for(3),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_log_reader_waits_for_pending_copies(reader):
    copier = DeferredCopies()
    logs, act = _logged(copier)
    assert copier.pending == 1
    READERS[reader](logs)
    assert copier.pending == 0 and copier.syncs == 1
    READERS[reader](logs)
    assert copier.syncs == 1  # once: a later read finds nothing pending
    assert torch.equal(LogStore.decode(logs.export("fwd", [3]))[(3, 0, 0, "fwd")], act)


def test_log_copies_read_the_tensor_as_sent():
    """A reader gets the bytes as they were when sent, once synchronized; the copier keeps
    the source alive until then."""
    copier = DeferredCopies()
    logs, act = _logged(copier)
    assert copier.kept_alive and copier.kept_alive[0].data_ptr() == act.data_ptr()
    logs.synchronize()
    assert torch.equal(logs.boundary[(3, 0, 0, "fwd")], act)
    with pytest.raises(TypeError):
        logs.records[4] = {}  # readers get read-only views


def test_key_only_queries_do_not_block():
    copier = DeferredCopies()
    logs, _ = _logged(copier)
    assert logs.coverage("fwd") == (3, 3) and logs.nbytes() > 0
    assert logs.iterations("data") == {3}
    assert copier.pending == 1


def test_cpu_defaults_have_no_copier_and_the_pool_pins_for_a_copier_that_does():
    assert SnapshotEngine(torch.device("cpu")).copier is None
    assert LogStore(torch.device("cpu")).copier is None
    assert SideStreamCopies.pinned is True
    pinning = types.SimpleNamespace(pinned=True)
    assert SnapshotEngine(torch.device("cpu"), copier=pinning).pool.pinned is True
