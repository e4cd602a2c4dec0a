"""Launch multi-process runs on free ports, with a timeout and no stray processes left behind.

``free_port()`` asks the OS for an unused port. ``run_torchrun()`` starts torchrun in its own
process group; if the run outlives its timeout, it kills torchrun's group and every descendant
with its own group (torchrun starts each worker in a new session, and the workers fork data
loader processes), so a hung rank never outlives the test that started it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunResult:
    """What a launched run left behind."""

    returncode: int
    seconds: float
    log_path: Path
    timed_out: bool = False

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from the parent links in /proc (empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s group, each descendant and each descendant's group."""
    pids = descendants(proc.pid)  # before the kill: orphans lose their link to proc
    groups = {proc.pid}
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never our own
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def run_command(cmd: list[str], *, log_path: str | os.PathLike, timeout_s: float,
                env: dict[str, str] | None = None, cwd: str | None = None) -> RunResult:
    """Run ``cmd`` in a new process group, output to ``log_path``; kill the group on timeout."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc, timed_out = -9, True
        except BaseException:
            _kill_tree(proc)
            raise
        finally:
            # torchrun normally reaps its workers; make sure nothing in the group survives.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return RunResult(rc, time.monotonic() - start, log_path, timed_out)


TORCHRUN = "torch.distributed.run"
FT_LAUNCHER = "nvidia_resiliency_ext.fault_tolerance.launcher"  # ft_launcher, torchrun's fork


def run_torchrun(script: str | os.PathLike, nproc: int, script_args: list[str], *,
                 log_path: str | os.PathLike, timeout_s: float,
                 env: dict[str, str] | None = None, max_restarts: int = 0,
                 python: str = sys.executable, launcher: str = TORCHRUN,
                 launcher_args: tuple[str, ...] = ()) -> RunResult:
    """Run ``script`` under torchrun (or ``launcher``, a module that takes torchrun's arguments,
    such as ``FT_LAUNCHER`` with its ``--ft-*`` ones in ``launcher_args``) with ``nproc``
    local workers on a free port."""
    # c10d rendezvous: each restart is a new rendezvous round with a fresh store prefix (the
    # static one reuses the first attempt's keys, so a restarted group connects to dead ranks)
    cmd = [
        python, "-m", launcher, *launcher_args,
        f"--nproc-per-node={nproc}", "--nnodes=1", f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id=moetion-{os.getpid()}-{time.monotonic_ns()}",
        str(script), *script_args,
    ]
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return run_command(cmd, log_path=log_path, timeout_s=timeout_s, env=full_env)


def free_port_block(count: int) -> int:
    """A port ``p`` with ``p .. p+count-1`` all unused on 127.0.0.1 (Megatron's in-process
    restart puts its stores on the two ports after ``MASTER_PORT``)."""
    for _ in range(100):
        base = free_port()
        socks = []
        try:
            for offset in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports found")


def _supervise(script, script_args, envs: list[dict], log_path: Path, timeout_s: float,
               python: str) -> RunResult:
    """One process per environment in ``envs``; nothing tears the job down when one dies.
    The return code is the first non-zero exit of a process that was not killed (SIGKILL, or
    SIGTERM from the in-process restart's hard timeout: the planned fault), else 0."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    procs = []
    with open(log_path, "ab") as log:
        try:
            for env in envs:
                procs.append(subprocess.Popen([python, str(script), *script_args], stdout=log,
                                              stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
            deadline = start + timeout_s
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)
            timed_out = any(p.poll() is None for p in procs)
            if timed_out:  # every thread's stack into the log (faulthandler on SIGUSR1)
                for p in procs:
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2)
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill_tree(p)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    codes = [p.returncode for p in procs]
    killed = (0, -signal.SIGKILL, -signal.SIGTERM)
    rc = -9 if timed_out else next((c for c in codes if c not in killed), 0)
    with open(log_path, "a") as log:
        log.write(f"[launcher] exit codes by process: {codes}\n")
    return RunResult(rc, time.monotonic() - start, log_path, timed_out)


def _base_env(env: dict[str, str] | None) -> dict[str, str]:
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", "1")
    base.setdefault("PYTHONUNBUFFERED", "1")
    return base


def run_with_reserves(script: str | os.PathLike, nproc: int, reserves: int,
                      script_args: list[str], *, log_path: str | os.PathLike, timeout_s: float,
                      env: dict[str, str] | None = None, external_stores: bool = False,
                      python: str = sys.executable) -> RunResult:
    """Run ``script`` as Megatron's ``--inprocess-restart`` expects it: ``nproc + reserves``
    processes with ``RANK`` / ``WORLD_SIZE`` counting both (nvidia-resiliency-ext's Wrapper
    makes ``nproc`` of them active), as srun would start them. Its stores take the two ports
    after ``MASTER_PORT``: hosted by initial rank 0, or with ``external_stores`` by this
    process (as ``python -m megatron_moetion.store_host`` would). Nothing tears the job down
    when one process dies."""
    from megatron_moetion.store_host import ENV_EXTERNAL_STORES, host_stores

    base = _base_env(env)
    port = free_port_block(3)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(nproc + reserves), TORCH_CPP_LOG_LEVEL="error")
    base[ENV_EXTERNAL_STORES] = "1" if external_stores else "0"
    stores = host_stores("127.0.0.1", port) if external_stores else []
    envs = [dict(base, RANK=str(rank)) for rank in range(nproc + reserves)]
    try:
        return _supervise(script, script_args, envs, Path(log_path), timeout_s, python)
    finally:
        del stores
