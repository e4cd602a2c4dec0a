"""Run a function on N gloo ranks in separate processes, with a timeout and clean teardown.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes, initialises a gloo
process group on a free port in each, calls ``fn(rank, world_size, *args)`` and returns the
per-rank results in rank order. A rank that raises makes the call raise ``RanksFailed`` with
every failing rank's traceback; a run that outlives ``timeout_s`` is killed and raises
``TimeoutError`` naming the ranks still alive. ``fn`` must be importable (module level).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta

from megatron_moetion.testing.launch import free_port


class RanksFailed(RuntimeError):
    """One or more ranks raised; ``failures`` maps rank to its formatted traceback."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        body = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed:\n{body}")


def _worker(fn, rank, world_size, port, backend, timeout_s, args, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001  (report everything to the parent)
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout_s: float = 60.0,
              backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; see module docstring."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, world_size, port, backend, timeout_s, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outputs, failures = {}, {}
    try:
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"run_ranks: ranks {alive} still running after {timeout_s}s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in outputs and r not in failures]
                for r in dead:
                    # exited without reporting (killed, segfault): give the queue a moment
                    time.sleep(0.2)
                    if results.empty():
                        failures[r] = f"process exited with code {procs[r].exitcode}"
                continue
            (outputs if ok else failures)[rank] = value
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    if failures:
        raise RanksFailed(failures)
    return [outputs[r] for r in range(world_size)]
