"""Persisted window files: round trip, and clear errors for corrupt or unknown files."""

import struct

import pytest
import torch

from megatron_moetion.errors import SnapshotFormatError
from megatron_moetion.snapshot import CaptureItem, SnapshotEngine, WindowLayout
from megatron_moetion.storage import (
    FORMAT_VERSION,
    PersistWriter,
    read_window,
    window_path,
    write_window,
)


@pytest.fixture
def window():
    engine = SnapshotEngine(torch.device("cpu"))
    a = torch.arange(100, dtype=torch.float32)
    b = torch.arange(10, dtype=torch.bfloat16)
    slots = [[CaptureItem("a", "op0", "active", a)], [CaptureItem("b", "op1", "frozen", b)]]
    win = engine.begin_window(7, 21, WindowLayout.build(slots), {"schedule": "x"})
    for k, items in enumerate(slots):
        engine.capture(win, k, items, {"iteration": 21 + k, "rng": torch.arange(4)})
    engine.seal(win)
    return win


def test_round_trip(tmp_path, window):
    path = write_window(tmp_path, 3, window)
    assert path == window_path(tmp_path, 3, 7) and not path.with_suffix(".tmp").exists()
    back = read_window(path)
    assert back.window_id == 7 and back.start_iteration == 21 and back.meta == {"schedule": "x"}
    spec_a, = back.items(0)
    spec_b, = back.items(1)
    assert torch.equal(back.view(spec_a), torch.arange(100, dtype=torch.float32))
    assert torch.equal(back.view(spec_b), torch.arange(10, dtype=torch.bfloat16))
    assert torch.equal(back.slot_meta[1]["rng"], torch.arange(4))


@pytest.mark.parametrize("where, message", [
    (lambda d: d.__setitem__(0, ord("X")), "not a MoEtion window file"),
    (lambda d: d.__setitem__(30, d[30] ^ 1), "header is corrupt"),
    (lambda d: d.__setitem__(-1, d[-1] ^ 1), "snapshot bytes are corrupt"),
    (lambda d: d.__delitem__(slice(-5, None)), "truncated"),
])
def test_corrupt_files_are_refused(tmp_path, window, where, message):
    path = write_window(tmp_path, 0, window)
    data = bytearray(path.read_bytes())
    where(data)
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match=message):
        read_window(path)


def test_newer_version_is_refused(tmp_path, window):
    path = write_window(tmp_path, 0, window)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match="format 2 is newer than supported 1"):
        read_window(path)


def test_metadata_corruption_is_caught_before_unpickling(tmp_path, window):
    path = write_window(tmp_path, 0, window)
    data = bytearray(path.read_bytes())
    hdr_len = struct.unpack_from("<I", data, 12)[0]
    data[20 + hdr_len + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotFormatError, match="metadata is corrupt"):
        read_window(path)


def test_background_writer(tmp_path, window):
    writer = PersistWriter(tmp_path, 1)
    writer.submit(window)
    writer.wait(7)
    writer.close()
    assert writer.written == [7] and read_window(window_path(tmp_path, 1, 7)).window_id == 7
    bad = PersistWriter("/proc/definitely/not/writable", 1)
    bad.submit(window)
    bad.close()
    assert bad.failures == 1 and bad.written == []
