"""``python -m megatron_moetion.bench`` (what ``make bench`` runs): the side-by-side benchmark.

One MoE configuration on CPU (4 gloo processes, PP=2 x EP=2 x DP=2), every scheme of
``bench.runs`` in the same invocation: per-iteration stall, bytes copied and host memory (medians
over iterations and repeats), then one fault per scheme: recovery seconds and rank-iterations
replayed against global rollbacks, each recovery checked bit for bit against its fault-free
twin. Writes ``bench.json``, ``bench.md`` and the plots to ``--out`` and prints the table.
Ratios come from one run of this script; nothing here is a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from megatron_moetion.bench.calculator import binding_lines, compute
from megatron_moetion.bench.ettr import young_daly_interval
from megatron_moetion.bench.ettr_paper import ettr_table
from megatron_moetion.bench.plots import (
    plot_ettr_vs_mtbf,
    plot_recovery_phases,
    plot_stall_per_iteration,
)
from megatron_moetion.bench.presets import PRESETS
from megatron_moetion.bench.runs import RunStats, bench_config, run_scheme
from megatron_moetion.demo.runner import REPO_ROOT
from megatron_moetion.oracle import compare_dumps

SCHEMES = ("none", "moetion", "dense", "moc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_moetion.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench")
    p.add_argument("--tiny", action="store_true", help="the test suite's quick size")
    p.add_argument("--repeats", type=int, default=None, help="runs per scheme (default 2, tiny 1)")
    p.add_argument("--window", type=int, default=3, help="MoEtion's sparse window W (>= 2)")
    p.add_argument("--mtbf-s", type=float, default=60.0,
                   help="MTBF in seconds for the CheckFreq-style Young/Daly interval")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    if args.repeats < 1 or args.window < 2 or args.mtbf_s <= 0:
        p.error("--repeats must be >= 1, --window >= 2 and --mtbf-s > 0")
    return args


def _med(stats: list[RunStats], attr: str):
    xs = [getattr(s, attr) for s in stats if getattr(s, attr) is not None]
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b not in (None, 0) else None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = bench_config(args.tiny)
    started = time.monotonic()
    print(f"[bench] {base.num_layers} layers, hidden {base.hidden_size}, {base.num_experts} "
          f"experts, PP={base.pp} EP={base.ep} DP={base.dp}, {base.train_iters} iterations, "
          f"{args.repeats} repeat(s), output {out}", flush=True)
    runs: dict[str, list[RunStats]] = {s: [] for s in SCHEMES}
    for rep in range(args.repeats):
        for scheme in SCHEMES:
            stats = run_scheme(base, scheme, out / f"{scheme}{rep}", window=args.window)
            print(f"[bench] {scheme} run {rep}: {'ok' if stats.ok else 'FAILED'} "
                  f"({stats.seconds:.0f} s)", flush=True)
            if not stats.ok:
                return 1
            runs[scheme].append(stats)
    # CheckFreq-style: Megatron's own torch_dist save, measured, every K iterations (Young/Daly)
    calib = run_scheme(base, "checkfreq", out / "checkfreq", window=args.window,
                       checkfreq_interval=2)
    iter_ms = _med(runs["none"], "iter_ms")
    interval = max(1, round(young_daly_interval((calib.save_ms or 0) / 1e3, args.mtbf_s,
                                                iter_ms / 1e3)))
    per_iter = {
        "none": {"stall_ms": 0.0, "bytes": 0, "host_bytes": 0},
        "checkfreq": {"stall_ms": (calib.save_ms or 0) / interval, "bytes": None,
                      "host_bytes": 0, "interval_iters": interval, "save_ms": calib.save_ms},
    }
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkfreq" / "ckpt").rglob("*")
                     if f.is_file()) / max(1, base.train_iters // 2) / base.world_size
    per_iter["checkfreq"]["bytes"] = round(ckpt_bytes / interval)
    for scheme in ("moetion", "dense", "moc"):
        per_iter[scheme] = {"stall_ms": _med(runs[scheme], "stall_ms"),
                            "bytes": _med(runs[scheme], "bytes_per_iter"),
                            "host_bytes": _med(runs[scheme], "host_bytes")}
    for scheme in per_iter:
        iter_s = _med(runs[scheme], "iter_ms") if scheme in runs else None
        per_iter[scheme]["iter_ms"] = iter_s if iter_s is not None else (
            iter_ms + per_iter[scheme]["stall_ms"])
        per_iter[scheme]["stall_share"] = _ratio(per_iter[scheme]["stall_ms"],
                                                 per_iter[scheme]["iter_ms"])
        per_iter[scheme]["iter_vs_none"] = _ratio(per_iter[scheme]["iter_ms"], iter_ms)
    dense = per_iter["dense"]
    for scheme in per_iter:
        per_iter[scheme]["stall_vs_dense"] = _ratio(per_iter[scheme]["stall_ms"],
                                                    dense["stall_ms"])
        per_iter[scheme]["bytes_vs_dense"] = _ratio(per_iter[scheme]["bytes"], dense["bytes"])

    recovery = run_recoveries(base, args, out, runs, interval)
    measured = {
        "t_iter_s": iter_ms / 1e3, "window": args.window,
        "stall_s": {"moetion": per_iter["moetion"]["stall_ms"] / 1e3,
                    "gemini": dense["stall_ms"] / 1e3,
                    "checkfreq": (calib.save_ms or 0) / 1e3,
                    "moc": per_iter["moc"]["stall_ms"] * args.window / 1e3},
        "recovery_s": {k: v["seconds"] for k, v in recovery.items() if v.get("seconds")
                       and k in ("moetion", "gemini", "checkfreq", "moc")},
    }
    paper = ettr_table()
    ours = ettr_table(measured=measured, num_runs=3)
    result = {"config": {"layers": base.num_layers, "hidden": base.hidden_size,
                         "experts": base.num_experts, "pp": base.pp, "ep": base.ep,
                         "dp": base.dp, "iterations": base.train_iters,
                         "repeats": args.repeats, "window": args.window,
                         "mtbf_s": args.mtbf_s},
              "per_iteration": per_iter, "recovery": recovery, "measured_for_ettr": measured,
              "ettr_paper_setting": [r.__dict__ | {"paper": [p.label() for p in r.paper]}
                                     for r in paper.rows],
              "ettr_paper_notes": list(paper.explanations),
              "ettr_measured_costs": [r.__dict__ | {"paper": [p.label() for p in r.paper]}
                                      for r in ours.rows],
              "wall_s": round(time.monotonic() - started, 1)}
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / "bench.md").write_text(table + "\n\n## ETTR, DeepSeek-16.4B from independent inputs "
                                  "(docs/performance.md)\n\n"
                                  + paper.markdown + "\n\n## ETTR with the costs measured here\n\n"
                                  + ours.markdown + "\n")
    plot_ettr_vs_mtbf(paper.rows, out / "ettr_vs_mtbf.png")
    plot_stall_per_iteration({k: v["stall_ms"] for k, v in per_iter.items()},
                             out / "stall_per_iteration.png")
    plot_recovery_phases({k: v.get("phases", {}) for k, v in recovery.items()
                          if v.get("phases")}, out / "recovery_phases.png")
    print(table)
    sizing = binding_lines([compute(p) for p in PRESETS.values()])
    (out / "bench.md").write_text((out / "bench.md").read_text() + "\n## W and its binding "
                                  "constraint per preset (calculator)\n\n"
                                  + "\n".join(f"- {line}" for line in sizing) + "\n")
    print("\n[bench] W and its binding constraint per preset (python -m "
          "megatron_moetion.bench.calculator):\n" + "\n".join(sizing))
    print(f"[bench] wrote {out / 'bench.json'}, {out / 'bench.md'} and 3 plots in "
          f"{result['wall_s']:.0f} s")
    return 0


def run_recoveries(base, args, out: Path, runs, interval: int) -> dict:
    """One lose_state fault per scheme, against its fault-free twin from the runs above."""
    f = base.train_iters - 3
    plan = f"rank=1,iter={f},phase=bwd,kind=lose_state"
    results = {}
    cases = [("moetion", "moetion", ()), ("gemini", "dense", ()),
             ("moc", "moc", ("--moetion-negative-control", "skip_conversion"))]
    for key, scheme, flags in cases[:1] if args.tiny else cases:
        stats = run_scheme(base.with_flags(*flags), scheme, out / f"fault_{key}",
                           window=args.window, fault_plan=plan)
        twin = out / (f"{'moetion' if scheme == 'moc' else scheme}0")
        verdict = compare_dumps(twin / "oracle", out / f"fault_{key}" / "oracle")
        rec = stats.recoveries[0] if stats.recoveries else {}
        results[key] = {
            "scheme": scheme, "seconds": rec.get("seconds"), "phases": rec.get("phases"),
            "rank_iterations_replayed": rec.get("rank_iterations_replayed"),
            "ranks_replaying": rec.get("ranks_replaying"),
            "replayed_iterations": rec.get("replayed_iterations"),
            "global_rollback_to_window_rank_iterations":
                rec.get("global_replay_from_window_rank_iterations"),
            "global_rollback_to_persistent_rank_iterations":
                (f - 1 - (f - 1) // interval * interval) * base.world_size,
            "bitwise_identical": verdict.identical,
            "note": ("MoC-style: stale operators resumed without conversion; loses state"
                     if key == "moc" else ""),
        }
        print(f"[bench] recovery {key}: {results[key]['seconds']} s, bitwise "
              f"{'identical' if verdict.identical else 'DIFFERENT'}", flush=True)
    if not args.tiny:
        # the persistent tier: every copy gone, Megatron --load of the last checkpoint
        fb = run_scheme(base.replace(replication_factor=1, save_interval=f - 3), "moetion",
                        out / "fault_checkfreq", window=args.window, max_restarts=1,
                        fault_plan=f"rank=0,iter={f},phase=bwd,kind=lose_state;"
                                   f"rank=1,iter={f},phase=bwd,kind=lose_state")
        twin_cmp = compare_dumps(out / "moetion0" / "oracle",
                                 out / "fault_checkfreq" / "oracle")
        clean = runs["moetion"][0].seconds
        results["checkfreq"] = {
            "scheme": "persistent checkpoint (Megatron --load)",
            "seconds": round(fb.seconds - clean, 1), "phases": {"restart_and_replay":
                                                                round(fb.seconds - clean, 1)},
            "rank_iterations_replayed": 3 * base.world_size,
            "bitwise_identical": twin_cmp.identical,
            "note": "job restarted from the checkpoint 3 iterations back; seconds are the extra "
                    "wall time over the fault-free run (process start-up dominates on CPU)",
        }
    return results


def markdown(result: dict) -> str:
    rows = ["| scheme | iteration (ms) | vs none | stall (ms) | stall share | stall vs dense | "
            "bytes/iter/rank | bytes vs dense | host bytes/rank |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["per_iteration"].items():
        rows.append(
            f"| {name} | {_fmt(v['iter_ms'])} | {_fmt(v['iter_vs_none'])} | {_fmt(v['stall_ms'])}"
            f" | {_fmt(v['stall_share'])} | {_fmt(v['stall_vs_dense'])} | {_fmt(v['bytes'])} | "
            f"{_fmt(v['bytes_vs_dense'])} | {_fmt(v['host_bytes'])} |")
    rows += ["", "| recovery | seconds | rank-iterations replayed | global rollback to the "
             "window | global rollback to the persistent checkpoint | bitwise identical |",
             "|---|---|---|---|---|---|"]
    for name, v in result["recovery"].items():
        rows.append(f"| {name} | {_fmt(v.get('seconds'))} | "
                    f"{_fmt(v.get('rank_iterations_replayed'))} | "
                    f"{_fmt(v.get('global_rollback_to_window_rank_iterations'))} | "
                    f"{_fmt(v.get('global_rollback_to_persistent_rank_iterations'))} | "
                    f"{v.get('bitwise_identical')} |")
    return "\n".join(rows)


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
