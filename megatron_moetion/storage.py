"""Versioned, checksummed files for persisted windows, written in the background.

One file per (rank, window): ``rank{R}.window{K}.moetion``::

    magic      8 bytes   b"MOETION\\0"
    version    4 bytes   little-endian uint32 (FORMAT_VERSION)
    hdr_len    4 bytes   little-endian uint32
    hdr_crc    4 bytes   CRC-32 of the header
    header     hdr_len   JSON: rank, window_id, sizes and CRC-32 of metadata and payload
    metadata   ...       the window's metadata (layout, per-iteration scalars), pickled
    payload    ...       the window's snapshot bytes

``read_window`` checks magic, version and all three checksums before it unpickles anything,
and raises ``SnapshotFormatError`` naming the file and what is wrong. Files are written to a
temporary name and renamed, so a reader never sees a half-written file. The metadata is a
pickle: like any PyTorch checkpoint, only load files you wrote.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import zlib
from pathlib import Path

import torch

from megatron_moetion.errors import SnapshotFormatError
from megatron_moetion.snapshot import SnapshotEngine, Window, checksum, unpack_meta

logger = logging.getLogger(__name__)

MAGIC = b"MOETION\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIII")


def window_path(directory: str | os.PathLike, rank: int, window_id: int) -> Path:
    return Path(directory) / f"rank{rank}.window{window_id}.moetion"


def write_window(directory: str | os.PathLike, rank: int, window: Window) -> Path:
    """Write one sealed window (synchronously); return its path."""
    if window.meta_blob is None:
        raise ValueError(f"window {window.window_id} is not sealed")
    nbytes = window.layout.total_bytes
    header = json.dumps({
        "format_version": FORMAT_VERSION, "rank": rank, "window_id": window.window_id,
        "start_iteration": window.start_iteration, "window": window.window,
        "meta_bytes": len(window.meta_blob), "meta_crc32": zlib.crc32(window.meta_blob),
        "payload_bytes": nbytes, "payload_crc32": SnapshotEngine.window_crc(window),
    }, sort_keys=True).encode()
    path = window_path(directory, rank, window.window_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
        f.write(header)
        f.write(window.meta_blob)
        f.write(memoryview(window.buffer[:nbytes].numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_window(path: str | os.PathLike) -> Window:
    """Read and verify one window file; raise ``SnapshotFormatError`` on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotFormatError(f"{path}: cannot read ({exc})") from exc
    if len(data) < _PREFIX.size:
        raise SnapshotFormatError(f"{path}: truncated ({len(data)} bytes), not a MoEtion window")
    magic, version, hdr_len, hdr_crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotFormatError(f"{path}: not a MoEtion window file (bad magic {magic!r})")
    if version > FORMAT_VERSION:
        raise SnapshotFormatError(
            f"{path}: snapshot format {version} is newer than supported {FORMAT_VERSION}; "
            f"upgrade megatron_moetion")
    if version < 1:
        raise SnapshotFormatError(f"{path}: unknown snapshot format version {version}")
    start = _PREFIX.size
    header_bytes = data[start:start + hdr_len]
    if len(header_bytes) != hdr_len or zlib.crc32(header_bytes) != hdr_crc:
        raise SnapshotFormatError(f"{path}: header is corrupt (checksum mismatch)")
    header = json.loads(header_bytes)
    meta_start = start + hdr_len
    payload_start = meta_start + header["meta_bytes"]
    meta = data[meta_start:payload_start]
    payload = data[payload_start:payload_start + header["payload_bytes"]]
    if len(meta) != header["meta_bytes"] or len(payload) != header["payload_bytes"]:
        raise SnapshotFormatError(f"{path}: truncated (expected {header['meta_bytes']} + "
                                  f"{header['payload_bytes']} bytes after the header)")
    if zlib.crc32(meta) != header["meta_crc32"]:
        raise SnapshotFormatError(f"{path}: metadata is corrupt (checksum mismatch)")
    buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if checksum(buffer) != header["payload_crc32"]:
        raise SnapshotFormatError(f"{path}: snapshot bytes are corrupt (checksum mismatch)")
    window = unpack_meta(meta, buffer)
    window.crc = header["payload_crc32"]
    return window


class PersistWriter:
    """Writes persisted windows in a background thread.

    ``submit(window)`` returns at once; ``wait(window_id)`` blocks until that window is on disk
    (the window's buffer must not be reused before). Errors are logged and counted, never
    raised into training.
    """

    def __init__(self, directory: str | os.PathLike, rank: int):
        self.directory = Path(directory)
        self.rank = rank
        self.written: list[int] = []
        self.failures = 0
        self._pending: dict[int, threading.Event] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="moetion-persist", daemon=True)
        self._thread.start()

    def submit(self, window: Window) -> None:
        done = threading.Event()
        self._pending[window.window_id] = done
        self._queue.put((window, done))

    def wait(self, window_id: int, timeout_s: float = 300.0) -> None:
        done = self._pending.pop(window_id, None)
        if done is not None:
            done.wait(timeout_s)

    def close(self, timeout_s: float = 300.0) -> None:
        for wid in list(self._pending):
            self.wait(wid, timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            window, done = item
            try:
                write_window(self.directory, self.rank, window)
                self.written.append(window.window_id)
            except Exception as exc:  # noqa: BLE001  (persistence never kills training)
                self.failures += 1
                logger.warning("[moetion] writing window %d to %s failed: %s",
                               window.window_id, self.directory, exc)
            finally:
                done.set()
