"""The per-iteration agreement: one small all-reduce on MoEtion's control group.

Every rank contributes whether it lost state since the last agreement, the latest replication
round it finished, the latest of its windows its buddies acknowledged, and the window size it
proposes for its next window. One ``all_reduce(MAX)`` over an int64 vector of ``world + 3``
entries gives every rank the same answer: the failed set, the world-wide minimum finished round
and acknowledged window (via negation), and the world-wide maximum window size. Decisions taken
from these values (ship or skip a window, which window is persisted, the next W, who replays)
are therefore identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Agreement:
    failed: tuple[int, ...]
    finished_round: int  # min over ranks (-1: none)
    acked_window: int  # min over ranks (-1: none)
    window_proposal: int  # max over ranks


def agree(group, world_size: int, rank: int, *, lost: bool, finished_round: int,
          acked_window: int, window_proposal: int) -> Agreement:
    """All ranks call this at the same point of the same iteration."""
    vec = torch.zeros(world_size + 3, dtype=torch.int64)
    vec[rank] = int(lost)
    vec[world_size] = -finished_round
    vec[world_size + 1] = -acked_window
    vec[world_size + 2] = window_proposal
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
    failed = tuple(int(r) for r in torch.nonzero(vec[:world_size]).flatten())
    return Agreement(failed, -int(vec[world_size]), -int(vec[world_size + 1]),
                     int(vec[world_size + 2]))
