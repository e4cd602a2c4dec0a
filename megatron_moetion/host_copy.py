"""Host buffers and device-to-host copies, shared by the snapshot engine, the replication thread
and the upstream logs.

``HostBufferPool`` reuses host buffers by size (pinned on GPU machines), so that after warm-up
no iteration allocates host memory. ``SideStreamCopies`` is the asynchronous copier on CUDA:
copies on a side stream, ordered after the work already issued on the training stream (the
ordering rules its users keep are in ``snapshot``'s docstring). ``measure_copy_bandwidth``
measures the device-to-host bandwidth that sizes the sparse window. ``DeferredCopies`` runs the
asynchronous path on CPU (tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch


class HostBufferPool:
    """Reuses host buffers by size; ``allocations`` counts fresh allocations (for tests)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # the replication thread takes buffers too
        self.allocations = 0

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes and (best is None or buf.numel() < self._free[best].numel()):
                    best = i
            if best is not None:
                return self._free.pop(best)
            self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def put(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            with self._lock:
                self._free.append(buf)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)

    def trim(self) -> int:
        """Let go of every free buffer (host memory over its cap); return the bytes freed.
        The next ``get`` of that size allocates again."""
        with self._lock:
            freed, self._free = sum(b.numel() for b in self._free), []
        return freed


class SideStreamCopies:
    """Device-to-host copies on a CUDA side stream: the engine's and the logs' copier.

    Args:
        device: the CUDA device the sources live on.
        stream: the side stream (created if None).
    """

    pinned = True  # destinations are pinned host memory

    def __init__(self, device: torch.device, stream=None):
        self.device = torch.device(device)
        self.stream = stream or torch.cuda.Stream(device=self.device)
        self.timing = CopyTiming()

    def launch(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
               keep_alive: Sequence[torch.Tensor] = ()):
        """Queue ``dst.copy_(src)`` for every pair after what the training stream has issued so
        far; ``keep_alive`` tensors are not reused by the allocator before the copies ran.
        Returns an event (the handle for the two calls below)."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            start = torch.cuda.Event(enable_timing=True)  # once the side stream gets here
            start.record(self.stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            for t in keep_alive:
                if t.is_cuda:
                    t.record_stream(self.stream)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
        self.timing.launched(sum(dst.numel() * dst.element_size() for dst, _ in pairs),
                             (start, done))
        return done

    def order_before_current(self, handle) -> None:
        """Work issued on the training stream from now on runs after the copies."""
        torch.cuda.current_stream(self.device).wait_event(handle)

    def synchronize(self, handle) -> None:
        """Block the host until the copies (and every copy launched before them) are done."""
        handle.synchronize()

    def totals(self) -> tuple[int, float]:
        """Bytes and seconds of the copies known to have landed, timed on the side stream
        (the achieved device-to-host bandwidth is their ratio)."""
        return self.timing.totals(lambda ev: ev[1].query(),
                                  lambda ev: ev[0].elapsed_time(ev[1]) / 1e3)


class CopyTiming:
    """Bytes and device seconds of an asynchronous copier's launches, summed as they land."""

    def __init__(self):
        self._open: list[tuple[int, object]] = []
        self._lock = threading.Lock()
        self.bytes = 0
        self.seconds = 0.0

    def launched(self, nbytes: int, clock) -> None:
        with self._lock:
            self._open.append((nbytes, clock))

    def totals(self, landed=lambda _: True, seconds=lambda clock: clock) -> tuple[int, float]:
        """Fold in the launches that ``landed(clock)``, in launch order; return the sums. The
        defaults are for copies timed on the host: landed, their clock their seconds."""
        with self._lock:
            while self._open and landed(self._open[0][1]):
                nbytes, clock = self._open.pop(0)
                self.bytes += nbytes
                self.seconds += seconds(clock)
            return self.bytes, self.seconds


DEFERRED_COPIES_ENV = "MOETION_DEFERRED_COPIES"


class DeferredCopies:
    """Runs the GPU copy path on CPU: each launch is queued, and the queue runs only when the
    engine orders the training stream after a handle or synchronizes on it, as a CUDA side
    stream would run the copies later. The unit tests use it directly; a Megatron run on CPU
    uses it when ``MOETION_DEFERRED_COPIES=1`` (``DEFERRED_COPIES_ENV``) is set, so the
    asynchronous and chunked paths run inside Megatron's training loop without a GPU.
    ``launch_log`` holds the bytes of each launch, in order."""

    pinned = False

    def __init__(self):
        self.queue: list[tuple[int, list]] = []
        self.launched = 0
        self.syncs = 0
        self.kept_alive: list[torch.Tensor] = []
        self.launch_log: list[int] = []
        self.timing = CopyTiming()

    def launch(self, pairs, keep_alive=()):
        self.launched += 1
        self.queue.append((self.launched, list(pairs)))
        self.kept_alive.extend(keep_alive)
        self.launch_log.append(sum(src.numel() * src.element_size() for _, src in pairs))
        return self.launched

    def _run_through(self, handle):
        while self.queue and self.queue[0][0] <= handle:
            _, pairs = self.queue.pop(0)
            start = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            self.timing.launched(sum(d.numel() * d.element_size() for d, _ in pairs),
                                 time.perf_counter() - start)

    def totals(self) -> tuple[int, float]:
        """As ``SideStreamCopies.totals``: the copies run so far, timed on the host."""
        return self.timing.totals()

    def order_before_current(self, handle):
        self._run_through(handle)

    def synchronize(self, handle):
        self.syncs += 1
        self._run_through(handle)

    @property
    def pending(self) -> int:
        return len(self.queue)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Device-to-host copy bandwidth in bytes/s into pinned memory (memcpy on CPU)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / max(best, 1e-9)
