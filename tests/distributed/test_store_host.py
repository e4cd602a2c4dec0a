"""``python -m megatron_moetion.store_host``: the --inprocess-restart stores outside every rank."""

import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist

from megatron_moetion.store_host import (
    APP_STORE_PORT_OFFSET,
    WRAPPER_STORE_PORT_OFFSET,
    external_stores,
)
from megatron_moetion.testing.launch import free_port_block


def test_both_stores_serve_clients_until_sigterm():
    port = free_port_block(3)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moetion.store_host", "--host",
                             "127.0.0.1", "--master-port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "stores on 127.0.0.1" in proc.stdout.readline()
        for offset in (APP_STORE_PORT_OFFSET, WRAPPER_STORE_PORT_OFFSET):
            writer = dist.TCPStore("127.0.0.1", port + offset, is_master=False,
                                   timeout=timedelta(seconds=10))
            writer.set("k", str(offset))
            reader = dist.TCPStore("127.0.0.1", port + offset, is_master=False,
                                   timeout=timedelta(seconds=10))
            assert reader.get("k") == str(offset).encode()  # one server, both clients
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_the_port_is_required_and_the_switch_is_checked(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    out = subprocess.run([sys.executable, "-m", "megatron_moetion.store_host"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--master-port" in out.stderr
    monkeypatch.setenv("MOETION_EXTERNAL_STORES", "yes")
    with pytest.raises(ValueError, match="MOETION_EXTERNAL_STORES must be 0 or 1; got 'yes'"):
        external_stores()
    monkeypatch.setenv("MOETION_EXTERNAL_STORES", "1")
    assert external_stores()
    monkeypatch.delenv("MOETION_EXTERNAL_STORES")
    assert not external_stores()
