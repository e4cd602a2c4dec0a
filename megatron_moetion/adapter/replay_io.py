"""What flows into and out of a rank during training and replay: pipeline sends and data.

``MoEtionP2PCommunicator`` is Megatron's ``P2PCommunicator`` with one seam overridden,
``_communicate``, through which every send and receive of the 1F1B schedule passes:

* normally it logs each tensor it sends (``fwd``: activations to the next stage, ``bwd``:
  gradients to the previous stage) keyed by (iteration, micro-batch), then communicates;
* while replaying, sends to a paused neighbour are dropped and receives from a paused
  neighbour are served from that neighbour's shipped logs; traffic with a neighbour that
  replays too goes over the wire as usual. Sends are logged only where the log lacks them (a
  failed rank rebuilds its own logs; survivors do not duplicate theirs).

Between two neighbours every send in one direction is received in the same order, so a
per-direction counter numbers the tensors alike on both ends: in 1F1B it is the micro-batch id;
in the interleaved schedule (a ring: the first stage receives its later chunks' activations from
the last stage) it is the position in that pair's stream, whatever chunk each tensor belongs
to. With ``--overlap-p2p-communication`` the schedule waits on a handle per posted operation;
operations served from the logs or dropped get handles that are already complete.

``RecordingIterator`` logs what the data iterator returns; ``ReadAheadIterator`` reads an
iteration's micro-batches before the schedule runs (at PP = 1 they are shipped to the buddies
first); ``ReplayIterator`` returns logged micro-batches again.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_moetion.upstream_log import LogStore


class FlowControl:
    """The per-iteration state the communicator and iterators consult.

    Attributes:
        logs: this rank's log store.
        iteration: the iteration being run (or replayed).
        replaying: whether this is a replay.
        prev_live / next_live: during replay, whether the previous / next stage replays too
            (then traffic with it is live); otherwise its logs stand in for it.
        sources: during replay, the neighbours' logs: direction -> {(iteration, mb): tensor}.
    """

    def __init__(self, logs: LogStore, log_boundary: bool):
        self.logs = logs
        self.log_boundary = log_boundary
        self.iteration = 0
        self.replaying = False
        self.prev_live = True
        self.next_live = True
        self.sources: dict[str, dict[tuple[int, int], torch.Tensor]] = {"fwd": {}, "bwd": {}}
        self.device = None
        self.dtype = None
        self.data_index = 0
        self._sent = {"fwd": 0, "bwd": 0}
        self._received = {"fwd": 0, "bwd": 0}

    def begin(self, iteration: int, *, replaying: bool = False) -> None:
        self.iteration, self.replaying = iteration, replaying
        self._sent = {"fwd": 0, "bwd": 0}
        self._received = {"fwd": 0, "bwd": 0}
        self.data_index = 0

    def on_send(self, direction: str, tensor: torch.Tensor) -> None:
        mb = self._sent[direction]
        self._sent[direction] += 1
        if self.log_boundary:
            self.logs.log_send((self.iteration, mb, 0, direction), tensor,
                               only_if_missing=self.replaying)

    def logged(self, direction: str) -> torch.Tensor:
        mb = self._received[direction]
        self._received[direction] += 1
        key = (self.iteration, mb)
        if key not in self.sources[direction]:
            from megatron_moetion.errors import RecoveryError

            raise RecoveryError(f"replay of iteration {self.iteration} needs the {direction} "
                                f"tensor of micro-batch {mb}, which was not shipped")
        t = self.sources[direction][key]
        out = t.to(device=self.device or t.device, dtype=self.dtype or t.dtype, copy=True)
        return out.requires_grad_(True)

    def on_data(self, item) -> None:
        self.logs.log_data(self.iteration, self.data_index, item, only_if_missing=self.replaying)
        self.data_index += 1


class _Done:
    """The handle of an operation served from the logs (or dropped): already complete."""

    def wait(self):
        return None

    def is_completed(self):
        return True


class MoEtionP2PCommunicator(P2PCommunicator):
    """See the module docstring."""

    def __init__(self, pp_group, config, flow: FlowControl):
        super().__init__(pp_group=pp_group, config=config)
        self.flow = flow
        flow.dtype = config.pipeline_dtype

    def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next,
                     tensor_shape, wait_on_reqs=True):
        flow = self.flow
        if tensor_send_next is not None:
            flow.on_send("fwd", tensor_send_next)
        if tensor_send_prev is not None:
            flow.on_send("bwd", tensor_send_prev)
        if not flow.replaying:
            return super()._communicate(
                tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape,
                wait_on_reqs=wait_on_reqs)
        send_next = tensor_send_next if flow.next_live else None
        send_prev = tensor_send_prev if flow.prev_live else None
        live_prev, live_next = recv_prev and flow.prev_live, recv_next and flow.next_live
        got_prev = got_next = reqs = None
        if send_next is not None or send_prev is not None or live_prev or live_next:
            got_prev, got_next, reqs = super()._communicate(
                tensor_send_next=send_next, tensor_send_prev=send_prev, recv_prev=live_prev,
                recv_next=live_next, tensor_shape=tensor_shape, wait_on_reqs=wait_on_reqs)
        if recv_prev and not flow.prev_live:
            got_prev = flow.logged("fwd")
        if recv_next and not flow.next_live:
            got_next = flow.logged("bwd")
        if not wait_on_reqs:  # the overlapped schedule waits on a handle per posted operation
            reqs = dict(reqs or {})
            for key, posted in (("send_next", tensor_send_next is not None),
                                ("send_prev", tensor_send_prev is not None),
                                ("recv_prev", recv_prev), ("recv_next", recv_next)):
                if posted and key not in reqs:
                    reqs[key] = _Done()
        return got_prev, got_next, reqs


class RecordingIterator:
    """Logs every item the wrapped data iterator returns."""

    def __init__(self, inner: Iterator, flow: FlowControl):
        self.inner, self.flow = inner, flow

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.inner)
        self.flow.on_data(item)
        return item


class ReadAheadIterator:
    """Reads ``n`` items of ``inner`` at once, then hands them out in order. The schedule
    asks for exactly one item per micro-batch (Megatron's ``get_batch``); asking for more
    is refused, since what was read ahead (and shipped) would then not be the whole
    iteration."""

    def __init__(self, inner: Iterator, n: int):
        self.items = [next(inner) for _ in range(n)]
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.items):
            from megatron_moetion.errors import UnsupportedConfigurationError

            raise UnsupportedConfigurationError(
                f"--moetion with --pipeline-model-parallel-size 1 reads each iteration's "
                f"{len(self.items)} micro-batches ahead (one per micro-batch) to ship them to "
                f"the buddies, but this forward_step asked for more")
        self.pos += 1
        return self.items[self.pos - 1]


class ReplayIterator:
    """Returns logged micro-batches, in order; running past them is a replay bug."""

    def __init__(self, items: list, iteration: int):
        self.items, self.iteration, self.pos = list(items), iteration, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.items):
            from megatron_moetion.errors import RecoveryError

            raise RecoveryError(f"replay of iteration {self.iteration} asked for micro-batch "
                                f"{self.pos}, but only {len(self.items)} were logged")
        item = self.items[self.pos]
        self.pos += 1
        return dict(item) if isinstance(item, dict) else item
