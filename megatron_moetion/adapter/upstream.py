"""The upstream log of one rank: what it sent and read, and how a replay is routed.

``UpstreamLog`` owns the rank's ``LogStore`` (boundary activations and gradients it sent, the
micro-batches it read, each iteration's global scalars), the ``FlowControl`` its pipeline
communicator and data iterators consult, and the communicator itself. It is the only writer of
the flow control: ``begin`` starts an iteration (or a replayed one), ``route_replay`` says which
neighbours replay too and serves the paused ones' logs, ``end_replay`` goes back to training.
"""

from __future__ import annotations

from megatron_moetion.adapter.replay_io import (
    FlowControl,
    MoEtionP2PCommunicator,
    ReadAheadIterator,
    RecordingIterator,
    ReplayIterator,
)
from megatron_moetion.errors import UnsupportedConfigurationError
from megatron_moetion.upstream_log import LogStore


def replay_iterator(items: list, iteration: int, like=None):
    """``ReplayIterator`` over ``items``; a list of it where ``like`` is a list."""
    it = ReplayIterator(items, iteration)
    return [it] * len(like) if isinstance(like, list) else it


class UpstreamLog:
    """See the module docstring.

    Args:
        device: the training device (logged tensors are copied to host from it).
        log_boundary: keep the pipeline sends (``--moetion-upstream-logging``).
    """

    def __init__(self, device, log_boundary: bool):
        self.store = LogStore(device)
        self._flow = FlowControl(self.store, log_boundary=log_boundary)
        self._flow.device = device
        self._p2p = None
        self._ctx = None

    # ------------------------------------------------------------------ generations
    def rebind(self, ctx) -> None:
        """Point at a generation's pipeline group (the communicator is built on first use)."""
        self._ctx, self._p2p = ctx, None
        self.end_replay()

    def release(self) -> None:
        self._ctx, self._p2p = None, None

    # ------------------------------------------------------------------ the schedule's inputs
    def install_communicator(self, kwargs: dict, model) -> None:
        """Make the schedule call (``kwargs``) communicate through the logging communicator."""
        if kwargs.get("p2p_communicator") is None and kwargs.get("pg_collection") is None:
            if self._p2p is None:
                from megatron.core.utils import get_model_config

                self._p2p = MoEtionP2PCommunicator(self._ctx.pp_group,
                                                   get_model_config(model[0]), self._flow)
            kwargs["p2p_communicator"], kwargs["pg_collection"] = (self._p2p,
                                                                   self._ctx.pg_collection)
        elif not isinstance(kwargs.get("p2p_communicator"), MoEtionP2PCommunicator):
            raise UnsupportedConfigurationError(
                "--moetion needs Megatron's default pipeline communicator; pretrain() was given "
                "a custom p2p_communicator/pg_collection")

    def begin(self, iteration: int, *, replaying: bool = False) -> None:
        self._flow.begin(iteration, replaying=replaying)

    def recording(self, data_iterator):
        """``data_iterator`` logged (interleaved pipelines: a list, one per model chunk)."""
        if isinstance(data_iterator, list):
            return [None if it is None else RecordingIterator(it, self._flow)
                    for it in data_iterator]
        return RecordingIterator(data_iterator, self._flow)

    def read_ahead(self, data_iterator, num_microbatches: int) -> ReadAheadIterator:
        """Read (and log) an iteration's ``num_microbatches`` micro-batches now."""
        return ReadAheadIterator(self.recording(data_iterator), num_microbatches)

    def items_read(self) -> int:
        """Micro-batches this rank's data iterator returned in the current iteration."""
        return self._flow.data_index

    def replay_iterator(self, iteration: int, like=None):
        """The logged micro-batches of ``iteration`` again, shaped ``like`` the schedule's data
        iterator: for a list (one per model chunk) one shared iterator in every place, as
        the chunks read in the same order as when they were logged."""
        return replay_iterator(self.store.data_for(iteration), iteration, like)

    # ------------------------------------------------------------------ replay routing
    def route_replay(self, sources: dict, prev_live: bool, next_live: bool) -> None:
        """During a replay: ``sources`` (direction -> {(iteration, mb): tensor}) stand in for
        the paused neighbours; traffic with a neighbour that replays too (``*_live``) is live."""
        self._flow.sources = sources
        self._flow.prev_live, self._flow.next_live = prev_live, next_live

    def end_replay(self) -> None:
        self._flow.replaying, self._flow.sources = False, {"fwd": {}, "bwd": {}}
        self._flow.prev_live = self._flow.next_live = True

    # ------------------------------------------------------------------ failures
    def drop_aborted(self, iteration: int, kinds=("data", "fwd", "bwd", "record")) -> None:
        """Forget what an aborted attempt of ``iteration`` logged (it is partial)."""
        for kind in kinds:
            self.store.drop_iteration(iteration, (kind,))
