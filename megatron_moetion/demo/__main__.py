"""The CPU demo: ``python -m megatron_moetion.demo`` (what ``make demo`` runs).

Trains a tiny MoE GPT (4 layers, hidden 64, 8 experts, top-2) with Megatron's own
``pretrain()`` on 4 gloo processes, PP=2 x EP=2 x DP=2 with the distributed optimizer, and
writes ``summary.json`` (path printed at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_moetion.demo.runner import REPO_ROOT, RunConfig, run_pretrain
from megatron_moetion.oracle import load_dump, losses_by_iteration
from megatron_moetion.reporting import snapshot_summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_moetion.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "demo",
                        help="output directory (default: runs/demo)")
    parser.add_argument("--iters", type=int, default=12, help="training iterations (>= 2)")
    parser.add_argument("--timeout-s", type=float, default=600, help="per-run timeout")
    args = parser.parse_args(argv)
    if args.iters < 2:
        parser.error(f"--iters must be >= 2; got {args.iters}")
    return args


def megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def summarize(cfg: RunConfig, run_dir: Path, seconds: float) -> dict:
    dumps = load_dump(run_dir / "oracle")
    losses = losses_by_iteration(dumps)
    return {
        "megatron_version": megatron_version(),
        "parallel": {"tp": 1, "pp": cfg.pp, "ep": cfg.ep, "dp": cfg.dp},
        "world_size": cfg.world_size,
        "iterations": len(losses),
        "losses": [losses[i] for i in sorted(losses)],
        "wall_s": round(seconds, 1),
        "run_dir": str(run_dir),
        "snapshot": snapshot_summary(run_dir / "metrics", cfg.replication_factor),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(train_iters=args.iters, moetion=True, window=3)
    print(f"[demo] training a tiny MoE GPT with Megatron pretrain(): PP={cfg.pp} EP={cfg.ep} "
          f"DP={cfg.dp}, {cfg.train_iters} iterations (log: {args.out / 'run' / 'log.txt'})",
          flush=True)
    start = time.monotonic()
    result = run_pretrain(cfg, args.out / "run", timeout_s=args.timeout_s)
    if result.returncode != 0:
        print(result.log_tail(80), file=sys.stderr)
        print(f"[demo] the run failed (exit code {result.returncode}); log: {result.log_path}",
              file=sys.stderr)
        return 1
    summary = summarize(cfg, args.out / "run", time.monotonic() - start)
    path = args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[demo] losses: {', '.join(f'{x:.4f}' for x in summary['losses'])}")
    snap = summary["snapshot"]
    print(f"[demo] sparse snapshots: W={snap['window']}, {snap['bytes_per_iter_mean']} bytes per "
          f"iteration per rank vs {snap['dense_bytes_per_iter']} dense "
          f"({snap['ratio_to_dense']}x), median stall {snap['stall_ms_median']} ms, "
          f"{snap['replication_factor']} buddies")
    print(f"[demo] summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
