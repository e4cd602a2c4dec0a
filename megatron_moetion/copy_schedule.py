"""Snapshot copies in chunks, issued where no expert-parallel all-to-all is in flight.

On a GPU node the device-to-host snapshot copies cross the same PCIe switches as the NIC
traffic of the expert-parallel all-to-all (token dispatch and combine), so a slot copied in one
burst after the optimizer step slows the next forward's all-to-alls and is slowed by them.
``ChunkedCopies`` holds a capture's copy pairs instead (``stage``) and hands them to the copier
a chunk at a time at *quiet points* of the schedule: the adapter calls ``quiet_point`` at the
start of every transformer layer's attention in the forward pass, and brackets every MoE
layer's forward (dispatch, experts, combine) with ``a2a_begin`` / ``a2a_end``; a quiet point
inside such a bracket issues nothing. Whatever is left when the copies are due (``flush``,
before the next optimizer step) is issued then, when no all-to-all runs either.

Each chunk is queued on the copier's stream after the work already issued on the training
stream, so it starts once the previous layer's combine has finished; its size is meant to
drain within one attention block. ``chunk_bytes`` = 0 sizes chunks so that a slot spreads
evenly over the quiet points seen in the previous iteration (at least one chunk per point).

Delaying a copy until a quiet point of the next forward is safe for the same reason the
asynchronous copy is (``snapshot``'s docstring): the items read only what the optimizer step
writes, and the next step waits for ``flush``; items written outside the step are cloned on
the training stream before ``stage``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch


def split_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                chunk_bytes: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(dst, src)`` 1-D pairs of equal dtype regrouped into chunks of at most
    ``chunk_bytes`` each (a large pair is cut into views), in order."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    chunks: list[list] = [[]]
    room = chunk_bytes
    for dst, src in pairs:
        size = src.element_size()
        start, n = 0, src.numel()
        while start < n:
            if room < size:
                chunks.append([])
                room = chunk_bytes
            take = min(n - start, max(1, room // size))
            chunks[-1].append((dst[start:start + take], src[start:start + take]))
            start += take
            room -= take * size
    return [c for c in chunks if c]


class ChunkedCopies:
    """Stages copy pairs and issues them in chunks at quiet points (see module docstring).

    Args:
        copier: the asynchronous copier (``host_copy.SideStreamCopies`` or a test's).
        chunk_bytes: bytes per chunk; 0 spreads a slot over last iteration's quiet points.

    Counters for the metrics and the tests: ``points`` (quiet points outside all-to-all
    brackets since the last ``stage``), ``chunks_issued``, ``chunks_at_points`` and
    ``issued_in_a2a`` (chunks issued while an all-to-all bracket was open: only ``flush``
    could, and it runs outside the forward).
    """

    def __init__(self, copier, chunk_bytes: int = 0):
        if chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0, got {chunk_bytes}")
        self.copier, self.chunk_bytes = copier, chunk_bytes
        self._queue: deque[list] = deque()
        self._keep_alive: list[torch.Tensor] = []
        self._in_a2a = 0
        self.last_handle = None
        self.points = 0
        self.points_last_iteration = 0
        self.chunks_issued = 0
        self.chunks_at_points = 0
        self.issued_in_a2a = 0
        self.previous: dict = {}

    @property
    def pending(self) -> int:
        """Chunks staged and not issued yet."""
        return len(self._queue)

    def stage(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
              keep_alive: Sequence[torch.Tensor] = ()) -> None:
        """A capture's copies, to be issued from the next quiet point on. Anything still staged
        from an earlier capture is issued first (its deadline has passed)."""
        self.flush()
        self.previous = self.stats(current=True)
        self.points_last_iteration, self.points = self.points, 0
        total = sum(src.numel() * src.element_size() for _, src in pairs)
        if not total:
            return
        size = self.chunk_bytes or math.ceil(total / max(1, self.points_last_iteration))
        self._queue.extend(split_pairs(pairs, size))
        self._keep_alive = list(keep_alive)
        self.chunks_issued = self.chunks_at_points = self.issued_in_a2a = 0

    def a2a_begin(self) -> None:
        self._in_a2a += 1

    def a2a_end(self) -> None:
        self._in_a2a = max(0, self._in_a2a - 1)

    def quiet_point(self) -> None:
        """A point of the forward where the next chunk may go: one outside every all-to-all
        bracket issues it (and counts towards sizing the next capture's chunks)."""
        if self._in_a2a:
            return
        self.points += 1
        if self._queue:
            self._issue(self._queue.popleft())
            self.chunks_at_points += 1

    def flush(self):
        """Issue every staged chunk now (the copies are due); returns the last handle."""
        while self._queue:
            self._issue(self._queue.popleft())
        return self.last_handle

    def _issue(self, chunk: list) -> None:
        if self._in_a2a:
            self.issued_in_a2a += 1
        # the first chunk keeps the staged clones alive until the copies that read them ran
        keep, self._keep_alive = self._keep_alive, []
        self.last_handle = self.copier.launch(chunk, keep_alive=keep)
        self.chunks_issued += 1

    def stats(self, current: bool = False) -> dict:
        """The counters of the previous capture, whose copies went out during the iteration
        just finished (``current``: of the capture staged last, still going out)."""
        if not current:
            return dict(self.previous)
        return {"copy_chunks": self.chunks_issued, "copy_chunks_at_quiet_points":
                self.chunks_at_points, "copy_quiet_points": self.points,
                "copy_chunks_in_a2a": self.issued_in_a2a}
