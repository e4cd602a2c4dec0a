"""Shared fixtures: the patched Megatron tree, cached fault-free runs, per-test output dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_moetion.demo.runner import PATCHED_MEGATRON, RunConfig, run_pretrain

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def patched_megatron() -> Path:
    """The patched Megatron tree; `make test` builds it (scripts/check_patches.sh)."""
    if not (PATCHED_MEGATRON / "megatron" / "training" / "training.py").exists():
        pytest.fail(f"no patched Megatron tree at {PATCHED_MEGATRON}: run `make patched-megatron`")
    return PATCHED_MEGATRON


class RunCache:
    """Runs each distinct RunConfig once per test session (fault-free twins are shared)."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[RunConfig, Path] = {}

    def get(self, cfg: RunConfig, *, timeout_s: float = 300) -> Path:
        if cfg not in self._done:
            out = self.root / f"run{len(self._done)}"
            result = run_pretrain(cfg, out, timeout_s=timeout_s)
            if result.returncode != 0:
                pytest.fail(f"baseline run failed (rc={result.returncode}, "
                            f"timed out: {result.timed_out}):\n{result.log_tail()}")
            self._done[cfg] = out
        return self._done[cfg]


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory, patched_megatron) -> RunCache:
    return RunCache(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def run_ok(patched_megatron):
    """``run_ok(cfg, out)``: run and fail the test with the log tail if the run fails."""

    def _run(cfg: RunConfig, out: Path, timeout_s: float = 300, **kwargs) -> Path:
        result = run_pretrain(cfg, out, timeout_s=timeout_s, **kwargs)
        if result.returncode != 0:
            pytest.fail(f"run failed (rc={result.returncode}, timed out: {result.timed_out}):"
                        f"\n{result.log_tail()}")
        return out

    return _run
