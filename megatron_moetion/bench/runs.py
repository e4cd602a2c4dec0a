"""The benchmark's runs: one MoE configuration, each checkpointing scheme, real Megatron.

Every scheme trains the same model with the same flags through Megatron's ``pretrain()`` on
CPU; only the checkpointing differs:

* ``none``: MoEtion off, no checkpoints (the reference iteration time);
* ``moetion``: sparse snapshots, window ``W``, two buddies;
* ``dense``: MoEtion with W=1, every operator's full state every iteration (Gemini-style);
* ``checkfreq``: Megatron's own ``torch_dist`` save every ``K`` iterations, K from Young/Daly
  for the chosen MTBF and the save time measured in a calibration run (CheckFreq-style);
* ``moc``: each slot's operators in full and nothing else (MoC-System-style partial expert
  checkpoints), whose recovery cannot be exact.

``parse_run`` turns a run's Megatron log and MoEtion metrics into per-iteration numbers.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics

_ITER_TIME = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): "
                        r"([0-9.]+)")
_SAVE_TIME = re.compile(r"save-checkpoint \.+: \(([0-9.]+), ([0-9.]+)\)")


def bench_config(tiny: bool) -> RunConfig:
    """The benchmark model: larger than the demo's so that snapshots cost something."""
    if tiny:
        return RunConfig(train_iters=10, num_experts=8)
    return RunConfig(train_iters=16, hidden_size=128, ffn_hidden_size=256, num_experts=16,
                     num_attention_heads=8, seq_length=64)


@dataclass
class RunStats:
    """Per-iteration medians of one run (iterations after the first two, the warm-up)."""

    scheme: str
    ok: bool
    iter_ms: float | None = None
    stall_ms: float | None = None
    bytes_per_iter: float | None = None
    dense_bytes_per_iter: float | None = None
    host_bytes: float | None = None
    save_ms: float | None = None
    recoveries: list = field(default_factory=list)
    seconds: float = 0.0


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def parse_run(scheme: str, out: Path, ok: bool, seconds: float) -> RunStats:
    log = (out / "log.txt").read_text(errors="replace") if (out / "log.txt").exists() else ""
    times = {int(i): float(ms) for i, ms in _ITER_TIME.findall(log)}
    saves = [float(hi) for _, hi in _SAVE_TIME.findall(log)]
    stats = RunStats(scheme, ok, seconds=seconds,
                     iter_ms=_median([ms for i, ms in times.items() if i > 2]),
                     save_ms=_median(saves))
    metrics = read_metrics(out / "metrics") if (out / "metrics").exists() else {}
    per_iter = [r for recs in metrics.values() for r in recs
                if r.get("kind") is None and r.get("iteration", 0) > 2]
    if per_iter:
        stats.stall_ms = _median([r.get("stall_ms") for r in per_iter])
        stats.bytes_per_iter = _median([r.get("snapshot_bytes") for r in per_iter])
        stats.dense_bytes_per_iter = _median([r.get("dense_bytes") for r in per_iter])
        stats.host_bytes = _median([r.get("host_bytes_held", 0) + r.get("log_bytes", 0)
                                    for r in per_iter])
    stats.recoveries = [r for r in metrics.get(0, []) if r.get("kind") == "recovery"]
    return stats


def scheme_config(base: RunConfig, scheme: str, window: int, checkfreq_interval: int,
                  out: Path) -> tuple[RunConfig, dict]:
    """The RunConfig and extra environment of one scheme."""
    if scheme == "none":
        return base, {}
    if scheme == "checkfreq":
        return base.replace(save_interval=checkfreq_interval), {}
    cfg = base.replace(moetion=True, window=1 if scheme == "dense" else window)
    if scheme == "moc":
        cfg = cfg.replace(extra_flags=(*cfg.extra_flags, "--moetion-bench-baseline", "moc"))
    return cfg, {}


def run_scheme(base: RunConfig, scheme: str, out: Path, *, window: int,
               checkfreq_interval: int = 1, fault_plan: str = "", env: dict | None = None,
               timeout_s: float = 300, max_restarts: int = 0) -> RunStats:
    cfg, extra = scheme_config(base, scheme, window, checkfreq_interval, out)
    if fault_plan:
        cfg = cfg.replace(fault_plan=fault_plan)
    result = run_pretrain(cfg, out, timeout_s=timeout_s, env={**extra, **(env or {})},
                          max_restarts=max_restarts)
    return parse_run(scheme, out, result.returncode == 0, result.seconds)
