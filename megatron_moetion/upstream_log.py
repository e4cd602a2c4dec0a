"""Upstream logs: what a rank sent across pipeline boundaries, the data it read, and the
per-iteration global scalars, kept in host memory for as long as recovery may need them.

Three kinds of entries, all keyed by iteration:

* ``boundary``: (iteration, micro-batch, virtual chunk, direction) -> the tensor exactly as sent
  (``fwd``: activation to the next stage; ``bwd``: gradient to the previous stage);
* ``data``: (iteration, index) -> the micro-batch object this rank's data iterator returned;
* ``record``: iteration -> global scalars of that iteration (the grad norm used for clipping,
  found-inf flags, whether the step was applied, micro-batch count, samples consumed).

Entries at or before the start of the persisted window are dropped (``truncate``): replay
never needs them. On GPU, boundary tensors are copied on a side stream into pinned memory
(``record_stream`` keeps the source alive until the copy ran); on CPU they are cloned.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import torch

BoundaryKey = tuple[int, int, int, str]  # iteration, microbatch, chunk, direction


def _host_copy(t: torch.Tensor, stream) -> torch.Tensor:
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.current_stream(t.device))
            out.copy_(t.detach(), non_blocking=True)
            t.record_stream(stream)
        return out
    return t.detach().clone()


def _to_host(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu").clone() if obj.is_cuda else obj
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class LogStore:
    """This rank's upstream logs (see module docstring).

    Args:
        device: the training device (CUDA: asynchronous copies into pinned memory).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" \
            else None
        self.boundary: dict[BoundaryKey, torch.Tensor] = {}
        self.data: dict[tuple[int, int], object] = {}
        self.records: dict[int, dict] = {}
        self.floor = 0  # iterations <= floor were dropped

    # --------------------------------------------------------------- writing
    def log_send(self, key: BoundaryKey, tensor: torch.Tensor, *, only_if_missing=False) -> None:
        if only_if_missing and key in self.boundary:
            return
        self.boundary[key] = _host_copy(tensor, self.stream)

    def log_data(self, iteration: int, index: int, item, *, only_if_missing=False) -> None:
        if only_if_missing and (iteration, index) in self.data:
            return
        self.data[(iteration, index)] = _to_host(item)

    def log_record(self, iteration: int, record: dict) -> None:
        self.records[iteration] = dict(record)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    # --------------------------------------------------------------- reading
    def data_for(self, iteration: int) -> list:
        items = sorted((idx, v) for (it, idx), v in self.data.items() if it == iteration)
        return [v for _, v in items]

    def iterations(self, kind: str) -> set[int]:
        if kind == "record":
            return set(self.records)
        if kind == "data":
            return {it for it, _ in self.data}
        return {it for it, _, _, d in self.boundary if d == kind}

    def nbytes(self) -> int:
        return (sum(_nbytes(t) for t in self.boundary.values())
                + sum(_nbytes(v) for v in self.data.values()))

    # --------------------------------------------------------------- lifetime
    def truncate(self, floor: int) -> None:
        """Drop everything of iterations <= ``floor``."""
        self.floor = max(self.floor, floor)
        self.boundary = {k: v for k, v in self.boundary.items() if k[0] > self.floor}
        self.data = {k: v for k, v in self.data.items() if k[0] > self.floor}
        self.records = {k: v for k, v in self.records.items() if k > self.floor}

    def drop_iteration(self, iteration: int, kinds: Iterable[str] = ("fwd", "bwd")) -> None:
        """Forget what was logged for ``iteration`` (an aborted attempt)."""
        kinds = set(kinds)
        self.boundary = {k: v for k, v in self.boundary.items()
                         if not (k[0] == iteration and k[3] in kinds)}
        if "data" in kinds:
            self.data = {k: v for k, v in self.data.items() if k[0] != iteration}

    def wipe(self) -> None:
        self.boundary.clear()
        self.data.clear()
        self.records.clear()

    # --------------------------------------------------------------- shipping
    def export(self, kind: str, iterations: Iterable[int]) -> bytes:
        """Serialise the entries of ``kind`` for ``iterations`` (tensors as raw tensors)."""
        its = set(iterations)
        if kind == "record":
            payload = {it: self.records[it] for it in sorted(its) if it in self.records}
        elif kind == "data":
            payload = {k: v for k, v in self.data.items() if k[0] in its}
        else:
            payload = {k: v for k, v in self.boundary.items() if k[0] in its and k[3] == kind}
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @staticmethod
    def decode(blob: bytes) -> dict:
        return torch.load(io.BytesIO(blob), weights_only=False)

    def absorb(self, kind: str, entries: dict) -> None:
        """Keep data or records received from another rank: a failed rank rebuilds its own
        logs this way (boundary logs it rebuilds by logging its replayed sends)."""
        if kind == "record":
            for it, rec in entries.items():
                self.records.setdefault(it, rec)
        elif kind == "data":
            for k, v in entries.items():
                self.data.setdefault(k, v)
        else:
            raise ValueError(f"cannot absorb {kind!r} entries; only 'data' and 'record'")

    def coverage(self, kind: str) -> tuple[int, int] | None:
        """(first, last) iteration held for ``kind``, or None."""
        its = self.iterations(kind)
        return (min(its), max(its)) if its else None
