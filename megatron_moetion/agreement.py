"""The per-iteration agreement: a small max-reduction on MoEtion's control group.

Every rank contributes whether it lost state since the last agreement, the latest replication
round it finished, the latest of its windows its buddies acknowledged, and the window size it
proposes for its next window. An element-wise MAX over every rank gives every rank the same
answer: the failed set, the world-wide minimum finished round and acknowledged window (via
negation), and the world-wide maximum window size. Decisions taken from these values (ship or
skip a window, which window is persisted, the next W, who replays) are therefore identical on
every rank.

Why two phases and recursive doubling (docs/scale.md): the first design reduced a vector of
``world + 3`` entries with ``dist.all_reduce`` every iteration; gloo runs it as a ring
(``gloo/allreduce.cc``: an unspecified algorithm is the ring), ``2 (p - 1)`` message steps,
about 0.8 s per iteration at 16k ranks with an assumed 25 us per step. Now:

1. every iteration, a constant vector of 4 entries ``[lost, -finished, -acked, W]``;
2. only when some rank lost state (the first entry is non-zero, on every rank alike), a second
   reduction of the per-rank flags names who;

and both reductions are recursive doubling over point-to-point messages, ``log2 p`` steps (two
more when p is not a power of two). MAX over integers is exact and order-free, so every rank
still ends with the same vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

HEAD = 4  # entries of the every-iteration vector: lost, -finished, -acked, window proposal


@dataclass(frozen=True)
class Agreement:
    failed: tuple[int, ...]
    finished_round: int  # min over ranks (-1: none)
    acked_window: int  # min over ranks (-1: none)
    window_proposal: int  # max over ranks


class Exchange(Protocol):
    """Point-to-point messages of int vectors between positions ``0..size-1`` of the group."""

    def send(self, peer: int, values: list[int]) -> None: ...

    def recv(self, peer: int, length: int) -> list[int]: ...

    def sendrecv(self, peer: int, values: list[int]) -> list[int]: ...


def max_rounds(world_size: int) -> int:
    """Message steps of one ``allreduce_max`` on ``world_size`` ranks (the latency model)."""
    if world_size <= 1:
        return 0
    p2 = 1 << (world_size.bit_length() - 1)
    return (p2.bit_length() - 1) + (2 if p2 < world_size else 0)


def allreduce_max(exchange: Exchange, world_size: int, rank: int,
                  values: Sequence[int]) -> list[int]:
    """Element-wise MAX of ``values`` over every rank, by recursive doubling.

    Ranks ``p2..world-1`` (p2 the largest power of two <= world) first fold their vector into
    rank ``r - p2`` and get the result back at the end; the first p2 ranks exchange with
    ``rank ^ mask`` for ``mask = 1, 2, 4, ...``. Every rank calls it with the same length.
    """
    vec = [int(v) for v in values]
    if world_size <= 1:
        return vec
    p2 = 1 << (world_size.bit_length() - 1)
    if rank >= p2:
        exchange.send(rank - p2, vec)
        return exchange.recv(rank - p2, len(vec))
    extra = rank + p2 < world_size
    if extra:
        vec = [max(a, b) for a, b in zip(vec, exchange.recv(rank + p2, len(vec)), strict=True)]
    mask = 1
    while mask < p2:
        other = exchange.sendrecv(rank ^ mask, vec)
        vec = [max(a, b) for a, b in zip(vec, other, strict=True)]
        mask <<= 1
    if extra:
        exchange.send(rank + p2, vec)
    return vec


def agree_over(exchange: Exchange, world_size: int, rank: int, *, lost: bool,
               finished_round: int, acked_window: int, window_proposal: int) -> Agreement:
    """``agree`` over any ``Exchange`` (the unit tests and the scale simulation use fakes)."""
    head = allreduce_max(exchange, world_size, rank,
                         [int(lost), -finished_round, -acked_window, window_proposal])
    failed: tuple[int, ...] = ()
    if head[0]:  # the same on every rank: all of them run the second phase, or none
        flags = [0] * world_size
        flags[rank] = int(lost)
        failed = tuple(r for r, f in enumerate(allreduce_max(exchange, world_size, rank, flags))
                       if f)
    return Agreement(failed, -head[1], -head[2], head[3])


class TorchExchange:
    """``Exchange`` over a torch.distributed group (int64 CPU tensors; gloo in MoEtion)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group

    def _global(self, peer: int) -> int:
        if self.group is None:
            return peer
        return self.dist.get_global_rank(self.group, peer)

    def send(self, peer: int, values: list[int]) -> None:
        import torch

        self.dist.send(torch.tensor(values, dtype=torch.int64), self._global(peer),
                       group=self.group)

    def recv(self, peer: int, length: int) -> list[int]:
        import torch

        buf = torch.empty(length, dtype=torch.int64)
        self.dist.recv(buf, self._global(peer), group=self.group)
        return buf.tolist()

    def sendrecv(self, peer: int, values: list[int]) -> list[int]:
        import torch

        out = torch.tensor(values, dtype=torch.int64)
        buf = torch.empty(len(values), dtype=torch.int64)
        peer = self._global(peer)
        works = [self.dist.isend(out, peer, group=self.group),
                 self.dist.irecv(buf, peer, group=self.group)]
        for w in works:
            w.wait()
        return buf.tolist()


def agree(group, world_size: int, rank: int, *, lost: bool, finished_round: int,
          acked_window: int, window_proposal: int) -> Agreement:
    """All ranks call this at the same point of the same iteration. ``rank`` is this rank's
    position in ``group`` (MoEtion's control group spans the world, so its global rank)."""
    return agree_over(TorchExchange(group), world_size, rank, lost=lost,
                      finished_round=finished_round, acked_window=acked_window,
                      window_proposal=window_proposal)
