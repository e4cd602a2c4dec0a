"""A run that outlives its timeout leaves no process behind: not torchrun, not its workers (each
in a session of its own), not what the workers forked."""

import os
import subprocess
import sys
import time
import uuid

from megatron_moetion.testing.launch import descendants, run_torchrun

HANG = """
import subprocess, sys, time
marker = sys.argv[1]
# a grandchild in the worker's group, like a data loader process, and one in a new session
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker],
                 start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def _alive_with(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_timed_out_run_leaves_no_stray_process(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    marker = f"moetion-stray-{uuid.uuid4().hex}"
    result = run_torchrun(script, 2, [marker], log_path=tmp_path / "log.txt", timeout_s=20)
    assert result.timed_out and result.returncode != 0
    assert "ready" in result.log_path.read_text()  # the hang really started
    deadline = time.monotonic() + 10
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive_with(marker) == []


def test_descendants_follows_the_process_tree():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                              "'-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 20
        while len(descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = descendants(os.getpid())
        assert child.pid in found and len(found) >= 2
    finally:
        for pid in descendants(child.pid) + [child.pid]:
            os.kill(pid, 9)
        child.wait()
