"""The CPU demo: ``python -m megatron_moetion.demo`` (what ``make demo`` runs).

Trains a tiny MoE GPT (4 layers, hidden 64, 8 experts, top-2) with Megatron's own
``pretrain()`` on 4 gloo processes, PP=2 x EP=2 x DP=2 with the distributed optimizer and
MoEtion on (window 3, two buddies, a persistent checkpoint at iteration 10), twice: once
without faults and once with a fault injected (``MOETION_FAULT_PLAN`` overrides the default),
then compares the two runs bit for bit and writes ``summary.json`` (path printed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron_moetion.bench.reporting import snapshot_summary
from megatron_moetion.config import ENV_FAULT_PLAN
from megatron_moetion.demo.runner import REPO_ROOT, RunConfig, run_pretrain
from megatron_moetion.fault_plan import FaultPlan
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps, load_dump, losses_by_iteration

DEFAULT_FAULT = "rank=1,iter=9,phase=bwd,kind=lose_state"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_moetion.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "demo",
                        help="output directory (default: runs/demo)")
    parser.add_argument("--iters", type=int, default=12, help="training iterations (>= 4)")
    parser.add_argument("--spares", type=int, default=0,
                        help="reserve ranks for the run with faults, under Megatron's "
                             "--inprocess-restart (nvidia-resiliency-ext's Wrapper): a killed "
                             "rank is replaced in place and the survivors keep their state "
                             "(default 0: a killed rank restarts the job from its last "
                             "checkpoint)")
    parser.add_argument("--timeout-s", type=float, default=600, help="per-run timeout")
    args = parser.parse_args(argv)
    if args.iters < 4:
        parser.error(f"--iters must be >= 4; got {args.iters}")
    if args.spares < 0:
        parser.error(f"--spares must be >= 0; got {args.spares}")
    return args


def megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def recovery_reports(run_dir: Path) -> list[dict]:
    """Every recovery and restart, in order, from the rank that saw most of them (every rank
    reports each in-memory recovery and restart; a dead rank does not report its own death)."""
    keep = ("kind", "cause", "fault_iteration", "failed", "seconds", "detection_s",
            "replayed_iterations", "conversion_iterations", "catch_up_iterations",
            "ranks_replaying", "ranks_paused", "rank_iterations_replayed",
            "global_rollback_rank_iterations", "global_replay_from_window_rank_iterations",
            "bytes_pulled", "bytes_shipped", "attempts", "phases", "anchor_iteration",
            "fallback", "reason", "checkpoint_iteration", "rollback_iterations",
            "faults_fired_before", "replaced_by", "generation")
    per_rank = {rank: [{k: r[k] for k in keep if k in r} for r in records
                       if r.get("kind") in ("recovery", "restart")]
                for rank, records in read_metrics(run_dir / "metrics").items()}
    if not per_rank:
        return []
    return max(sorted(per_rank.items()), key=lambda item: len(item[1]))[1]


def run(cfg: RunConfig, out: Path, label: str, timeout_s: float):
    print(f"[demo] {label}: training with Megatron pretrain() (log: {out / 'log.txt'})",
          flush=True)
    result = run_pretrain(cfg, out, timeout_s=timeout_s, max_restarts=1)
    if result.returncode != 0:
        print(f"[demo] {label} failed (exit code {result.returncode}); log: {result.log_path}",
              file=sys.stderr)
        print(f"[demo] {why_unrecoverable(cfg)}", file=sys.stderr)
    return result


def why_unrecoverable(cfg: RunConfig) -> str:
    """One line: what died, why the run could not continue, what would have saved it."""
    deaths = [f for f in FaultPlan.parse(cfg.fault_plan).faults if f.kind in ("kill", "hang")]
    if not deaths:
        return "training failed; the end of the log above says why"
    first = deaths[0]
    what = "was killed" if first.kind == "kill" else "stopped answering"
    missing = []
    if len(deaths) > cfg.spares:
        missing.append(f"{len(deaths)} reserve rank(s) (--spares {len(deaths)}) to replace "
                       f"it in place")
    if cfg.save_interval <= 0 or first.iteration <= cfg.save_interval:
        missing.append(f"a persistent checkpoint before iteration {first.iteration} (the "
                       f"demo saves every {cfg.save_interval} iterations)")
    cure = " or ".join(missing) if missing else "a longer --timeout-s"
    return (f"rank {first.rank} {what} at iteration {first.iteration} and nothing could take "
            f"its place: {cure} would have saved the run")


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = FaultPlan.parse(os.environ.get(ENV_FAULT_PLAN) or DEFAULT_FAULT)
    # a rank that stops answering (kind=hang) is declared dead after 5 s
    base = RunConfig(train_iters=args.iters, moetion=True, window=3, save_interval=10,
                     extra_flags=("--moetion-heartbeat-interval-s", "0.5",
                                  "--moetion-detect-timeout-s", "5"))
    print(f"[demo] tiny MoE GPT, PP={base.pp} EP={base.ep} DP={base.dp}, {base.train_iters} "
          f"iterations, sparse window W={base.window}; fault plan: {plan}", flush=True)
    start = time.monotonic()
    clean, faulted = args.out / "fault_free", args.out / "faulted"
    for path in (clean, faulted):
        if path.exists():
            import shutil

            shutil.rmtree(path)
    if run(base, clean, "fault-free run", args.timeout_s).returncode != 0:
        return 1
    # with reserve ranks the launcher hosts the restart's stores (as store_host would): any
    # rank, rank 0 included, can be replaced
    if run(base.replace(fault_plan=str(plan), spares=args.spares,
                        external_stores=args.spares > 0), faulted, "run with faults",
           args.timeout_s).returncode != 0:
        return 1
    comparison = compare_dumps(clean / "oracle", faulted / "oracle")
    losses = losses_by_iteration(load_dump(faulted / "oracle"))
    summary = {
        "megatron_version": megatron_version(),
        "parallel": {"tp": base.tp, "pp": base.pp, "ep": base.ep, "dp": base.dp},
        "world_size": base.world_size,
        "iterations": len(losses),
        "losses": [losses[i] for i in sorted(losses)],
        "snapshot": snapshot_summary(clean / "metrics", base.replication_factor),
        "faults": [str(f) for f in plan.faults],
        "recovery": recovery_reports(faulted),
        "bitwise_identical_to_fault_free": comparison.identical,
        "comparison": str(comparison),
        "oracle": comparison.summary(),
        "wall_s": round(time.monotonic() - start, 1),
        "runs": {"fault_free": str(clean), "faulted": str(faulted)},
    }
    path = args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[demo] losses: {', '.join(f'{x:.4f}' for x in summary['losses'])}")
    snap = summary["snapshot"]
    print(f"[demo] sparse snapshots: W={snap['window']}, {snap['bytes_per_iter_mean']} bytes per "
          f"iteration per rank vs {snap['dense_bytes_per_iter']} dense "
          f"({snap['ratio_to_dense']}x), median stall {snap['stall_ms_median']} ms, "
          f"{snap['replication_factor']} buddies")
    for rec in summary["recovery"]:
        if rec["kind"] == "restart":
            print(f"[demo] the job restarted from the checkpoint of iteration "
                  f"{rec['checkpoint_iteration']} (faults fired before: "
                  f"{'; '.join(rec.get('faults_fired_before') or []) or 'none'})")
            continue
        if rec.get("cause") == "process_failure" and rec.get("replaced_by"):
            spares = ", ".join(f"rank {r} by reserve rank {p}"
                               for r, p in rec["replaced_by"].items())
            detected = (f"detected after {rec['detection_s']:.1f} s, "
                        if rec.get("detection_s") is not None else "")
            print(f"[demo] {rec['reason']}; {detected}replaced in place ({spares}); the "
                  f"survivors kept their state")
            continue
        if rec.get("cause") == "process_failure":
            print(f"[demo] {rec['reason']}; detected after {rec['detection_s']:.1f} s, every "
                  f"rank stopped for a restart from the checkpoint of iteration "
                  f"{rec.get('checkpoint_iteration')}")
            continue
        if rec.get("fallback"):
            print(f"[demo] recovery at iteration {rec['fault_iteration']}: fell back to the "
                  f"checkpoint of iteration {rec.get('checkpoint_iteration')} "
                  f"({rec.get('reason')})")
            continue
        print(f"[demo] recovery at iteration {rec['fault_iteration']}: ranks "
              f"{rec['ranks_replaying']} replayed {rec['replayed_iterations']} iterations "
              f"({rec['conversion_iterations']} conversion + {rec['catch_up_iterations']} "
              f"catch-up) in {rec['seconds']:.2f} s while ranks {rec['ranks_paused']} paused; "
              f"{rec['rank_iterations_replayed']} rank-iterations replayed, against "
              f"{rec.get('global_replay_from_window_rank_iterations')} if every rank replayed "
              f"from the same window and {rec.get('global_rollback_rank_iterations')} for a "
              f"global rollback to the last persistent checkpoint")
    verdict = "IDENTICAL" if comparison.identical else "DIFFERENT"
    print(f"[demo] bitwise comparison with the fault-free run: {verdict} ({comparison})")
    print(f"[demo] summary: {path}")
    return 0 if comparison.identical else 2


if __name__ == "__main__":
    sys.exit(main())
