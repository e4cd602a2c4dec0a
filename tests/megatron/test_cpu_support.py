"""One test per CPU workaround (each checked in a fresh interpreter, where it is installed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moetion.testing.cpu_support import WORKAROUNDS

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def probe():
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_cpu_support_probe.py"))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_workaround_is_applied(probe):
    assert probe["applied"] == list(WORKAROUNDS) or sorted(probe["applied"]) == sorted(WORKAROUNDS)


@pytest.mark.parametrize("name", [w for w in WORKAROUNDS] + ["refuses_on_cuda"])
def test_workaround(probe, name):
    assert probe[name] == "ok", probe[name]


def test_a_disabled_workaround_is_not_applied():
    code = ("import os; os.environ['MOETION_CPU_DISABLE']='inprocess_ckpt_queue';"
            "from megatron_moetion.testing import cpu_support; print(cpu_support.install())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "inprocess_ckpt_queue" not in out.stdout and "device_mode" in out.stdout
