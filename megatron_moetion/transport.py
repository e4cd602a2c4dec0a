"""Point-to-point transport of checksummed parcels over a process group of MoEtion's own.

A ``Parcel`` is a flat uint8 tensor (snapshot bytes, logs) plus a small byte blob (pickled
metadata) plus a few integer ids. ``ProcessGroupTransport`` sends it as a header, the tensor in
chunks and the blob, and the receiver checks the CRC-32 of both. Used by replication (buddy
rounds), by recovery (pulling a window from a buddy) and to ship upstream logs.

Call order: both sides call with the same ``tag``; ``exchange`` posts a send and a receive at
once (every rank of a ring sends to one peer while receiving from another); ``send``/``recv``
are the one-sided halves. Every wait is bounded by the process group's timeout.

The group must be gloo, on GPU machines too: parcels live in (pinned) host memory and go
straight from there, and the replication thread that drives most transfers must never issue
NCCL operations concurrently with training's own (see docs/design.md, "Where replicas go").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_moetion.snapshot import checksum

_HEADER_LEN = 8  # data_nbytes, blob_nbytes, crc_data, crc_blob, id0..id3
_CHUNK_TAG_STRIDE = 4


@dataclass
class Parcel:
    """What travels: ``data`` (uint8, host), ``blob`` (bytes) and up to four integer ids."""

    data: torch.Tensor
    blob: bytes = b""
    ids: tuple[int, ...] = ()
    crc_data: int | None = None  # computed when sent if None


@dataclass
class Received:
    parcel: Parcel
    ok: bool  # both checksums matched
    reason: str = ""


def _header(parcel: Parcel, data_nbytes: int) -> torch.Tensor:
    ids = list(parcel.ids) + [0] * (4 - len(parcel.ids))
    crc = parcel.crc_data if parcel.crc_data is not None else checksum(parcel.data, data_nbytes)
    blob_crc = checksum(torch.frombuffer(bytearray(parcel.blob), dtype=torch.uint8)) \
        if parcel.blob else 0
    return torch.tensor([data_nbytes, len(parcel.blob), crc, blob_crc, *ids[:4]],
                        dtype=torch.int64)


class ProcessGroupTransport:
    """Checksummed parcels over ``group`` (see module docstring).

    Args:
        group: a gloo process group used only by MoEtion (anything else is refused).
        chunk_bytes: the tensor is sent in chunks of at most this many bytes.
    """

    def __init__(self, group, chunk_bytes: int = 16 << 20):
        backend = str(dist.get_backend(group))
        if backend != "gloo":
            raise ValueError(f"MoEtion's transport needs a gloo process group (host buffers, "
                             f"a background thread); got a {backend} group")
        self.group = group
        self.chunk_bytes = chunk_bytes
        self.bytes_sent = 0

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int):
        return dist.isend(tensor, dst=dst, group=self.group, tag=tag), tensor

    def _irecv(self, tensor: torch.Tensor, src: int, tag: int):
        return dist.irecv(tensor, src=src, group=self.group, tag=tag)

    def exchange(self, *, send_to: int | None, parcel: Parcel | None, recv_from: int | None,
                 tag: int, alloc: Callable[[int], torch.Tensor] | None = None,
                 corrupt: bool = False) -> Received | None:
        """Send ``parcel`` to ``send_to`` while receiving one from ``recv_from``.

        Args:
            alloc: returns a uint8 host tensor of at least n bytes for the received data.
            corrupt: flip one byte of what is sent (fault injection: the peer must notice).
        Returns:
            what was received (None when ``recv_from`` is None).
        """
        alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8))
        base = tag * _CHUNK_TAG_STRIDE
        out_n = parcel.data.numel() if parcel is not None else 0
        reqs, keep = [], []
        header_in = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        if send_to is not None:
            w, t = self._isend(_header(parcel, out_n), send_to, base)
            reqs.append(w)
            keep.append(t)
        if recv_from is not None:
            reqs.append(self._irecv(header_in, recv_from, base))
        self._wait(reqs)
        in_n, in_blob_n = int(header_in[0]), int(header_in[1])
        data_in = alloc(in_n) if recv_from is not None else None
        chunk = self.chunk_bytes
        n_chunks = max((out_n + chunk - 1) // chunk, (in_n + chunk - 1) // chunk)
        for c in range(n_chunks):
            reqs = []
            a = c * chunk
            if send_to is not None and a < out_n:
                piece = parcel.data[a:min(a + chunk, out_n)]
                if corrupt and c == 0:
                    piece = piece.clone()
                    piece[0] ^= 0xFF
                w, t = self._isend(piece, send_to, base + 1)
                reqs.append(w)
                keep.append(t)
            if recv_from is not None and a < in_n:
                reqs.append(self._irecv(data_in[a:min(a + chunk, in_n)], recv_from, base + 1))
            self._wait(reqs)
        reqs = []
        blob_in = torch.empty(in_blob_n, dtype=torch.uint8)
        if send_to is not None and parcel.blob:
            blob_out = torch.frombuffer(bytearray(parcel.blob), dtype=torch.uint8)
            w, t = self._isend(blob_out, send_to, base + 2)
            reqs.append(w)
            keep.append(t)
        if recv_from is not None and in_blob_n:
            reqs.append(self._irecv(blob_in, recv_from, base + 2))
        self._wait(reqs)
        self.bytes_sent += out_n + (len(parcel.blob) if parcel is not None else 0)
        if recv_from is None:
            return None
        blob = bytes(blob_in.numpy().tobytes())
        ids = tuple(int(x) for x in header_in[4:])
        received = Parcel(data_in, blob, ids, int(header_in[2]))
        if checksum(data_in, in_n) != int(header_in[2]):
            return Received(received, False, "data checksum mismatch")
        if in_blob_n and checksum(blob_in) != int(header_in[3]):
            return Received(received, False, "metadata checksum mismatch")
        return Received(received, True)

    def send(self, dst: int, parcel: Parcel, tag: int, corrupt: bool = False) -> None:
        self.exchange(send_to=dst, parcel=parcel, recv_from=None, tag=tag, corrupt=corrupt)

    def recv(self, src: int, tag: int, alloc=None) -> Received:
        return self.exchange(send_to=None, parcel=None, recv_from=src, tag=tag, alloc=alloc)


    def exchange_ints(self, *, send_to: int | None, values: list[int] | None,
                      recv_from: int | None, n: int, tag: int) -> list[int] | None:
        reqs, out = [], torch.zeros(n, dtype=torch.int64)
        if send_to is not None:
            w, _ = self._isend(torch.tensor(values, dtype=torch.int64), send_to,
                               tag * _CHUNK_TAG_STRIDE + 3)
            reqs.append(w)
        if recv_from is not None:
            reqs.append(self._irecv(out, recv_from, tag * _CHUNK_TAG_STRIDE + 3))
        self._wait(reqs)
        return [int(x) for x in out] if recv_from is not None else None

    @staticmethod
    def _wait(reqs) -> None:
        for w in reqs:
            w.wait()
