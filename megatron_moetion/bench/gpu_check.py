"""MoEtion inside Megatron's training loop on one GPU: overhead, exact snapshots, recovery.

What ``scripts/gpu_check.sh`` runs (one prepared script, about 6 minutes on an H200, no
network). Each step goes into one JSON file; a step that fails is recorded with its error and
the others still run:

1. ``peak``: the device-to-host bandwidth into pinned memory (``bench.gpu.copy_bandwidth``).
2. ``ways``: one Megatron MoE GPT (``GPU_MODEL``: about 1.3B parameters, 32 fine-grained
   experts, top-4, bf16 with FP32 main weights, the distributed optimizer, the local layer
   spec) trained three ways on one rank: MoEtion off; on with W from Algorithm 1 (copy
   bandwidth and forward-backward time measured at start-up); dense snapshots every iteration
   (W = 1). Per way: the median of Megatron's own "elapsed time per iteration" after the
   warm-up, the stall against off, MoEtion's own stall, snapshot bytes per iteration, the
   achieved copy bandwidth (bytes over the copier's own stream time) against the peak, the W
   chosen and what bound it.
3. ``exactness``: a smaller model of the same shape with W = 3 (sparse slots), every window
   persisted and the live state dumped after every step: every captured slot equals the live
   state bit for bit (``testing.snapshot_check``), compute weights captured from the device
   included.
4. ``recovery``: two ranks (PP = 1, EP = 2, DP = 2), a ``lose_state`` fault recovered from
   the buddy's memory in deterministic mode, against its fault-free twin, bit for bit; and the
   negative control that must end different (the same fault recovered without the
   sparse-to-dense conversion, frozen operators left at their compute weights). In-memory
   recovery needs the failed rank's window on another rank (a ``lose_state`` fault takes the
   rank's own host copies with it) and NCCL refuses two ranks on one GPU, so with fewer than two
   GPUs this step is recorded as skipped, with that reason.

``--cpu-smoke`` runs every step on the CPU with the tiny test model (what ``make test`` runs,
so the script's logic cannot rot; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

# one GPU: ~1.34B parameters (8 layers x (17M attention + 32 experts x 4.2M) + 134M untied
# embeddings), ~0.3B active per token; bf16 compute, FP32 main weights and Adam state
GPU_MODEL = RunConfig(
    device="cuda", num_layers=8, hidden_size=2048, ffn_hidden_size=4096,
    num_attention_heads=16, seq_length=2048, micro_batch_size=2, global_batch_size=8,
    num_experts=32, topk=4, pp=1, ep=1, dp=1, vocab_size=32768, bf16=True,
    deterministic=False, oracle=False, train_iters=25, lr=1e-4,
    extra_flags=("--moe-ffn-hidden-size", "1024", "--log-throughput"))
GPU_SMALL = GPU_MODEL.replace(num_layers=2, hidden_size=512, ffn_hidden_size=1024,
                              num_attention_heads=8, seq_length=512, num_experts=8, topk=2,
                              train_iters=12,
                              extra_flags=("--moe-ffn-hidden-size", "256"))
CPU_MODEL = RunConfig(pp=1, ep=1, dp=1, bf16=True, train_iters=6, deterministic=False,
                      oracle=False)
CPU_SMALL = CPU_MODEL.replace(train_iters=12)
WARMUP = {"cuda": 5, "cpu": 2}

_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
_PARAMS = re.compile(r"number of parameters on .*?: (\d+)")


def iteration_times(log: str) -> dict[int, float]:
    """Megatron's "elapsed time per iteration (ms)" by iteration, from a run's log."""
    return {int(m.group(1)): float(m.group(2)) for m in _ITER.finditer(log)}


def _int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Check:
    """Runs the steps, keeps the result and the log; ``deadline`` bounds every run."""

    def __init__(self, out: Path, cpu: bool, budget_s: float):
        self.out, self.cpu = out, cpu
        self.device = "cpu" if cpu else "cuda"
        self.deadline = time.monotonic() + budget_s
        self.result: dict = {"device": self._device_name(), "torch": torch.__version__,
                             "steps": {}, "errors": {}}
        self.log = open(out / "gpu_check.log", "a")  # noqa: SIM115  (closed in main)

    def _device_name(self) -> str:
        return "cpu" if self.cpu else torch.cuda.get_device_name(0)

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def step(self, name: str, fn) -> None:
        t0 = time.monotonic()
        self.say(f"{name}: start")
        try:
            self.result["steps"][name] = fn()
            self.say(f"{name}: done in {time.monotonic() - t0:.0f} s")
        except Exception as e:  # a failed step is recorded; the others still run
            self.result["errors"][name] = f"{type(e).__name__}: {e}"
            self.say(f"{name}: FAILED\n{traceback.format_exc()}")

    def run(self, cfg: RunConfig, name: str):
        left = self.deadline - time.monotonic()
        if left < 20:
            raise TimeoutError(f"no time left for run {name!r}")
        out = self.out / "runs" / name
        result = run_pretrain(cfg, out, timeout_s=left)
        log = (out / "log.txt").read_text(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"run {name!r} failed (rc={result.returncode}, timed out: "
                               f"{result.timed_out}):\n{result.log_tail()}")
        return out, log

    # ------------------------------------------------------------------ steps
    def peak(self) -> dict:
        from megatron_moetion.bench.gpu import copy_bandwidth

        sizes = (8, 64) if self.cpu else (256, 1024)
        rows = copy_bandwidth(torch.device(self.device), sizes_mb=sizes)
        if not self.cpu:
            torch.cuda.empty_cache()  # the training runs that follow get the whole device
        pinned = [r["gb_per_s"] for r in rows if r["pinned"] or self.cpu]
        return {"copy_gbps": max(pinned), "by_size": rows}

    def ways(self) -> dict:
        base = CPU_MODEL if self.cpu else GPU_MODEL
        warm = WARMUP[self.device]
        ways = {"off": base,
                "algorithm1": base.replace(moetion=True, window=0),
                "dense": base.replace(moetion=True, window=1)}
        peak = self.result["steps"].get("peak", {}).get("copy_gbps")
        out: dict = {"model": _model(base), "warmup_iterations": warm,
                     "measured_iterations": base.train_iters - warm}
        for name, cfg in ways.items():
            run_dir, log = self.run(cfg, name)
            out[name] = _way(run_dir, log, warm, peak)
            if out.get("parameters") is None and _PARAMS.search(log):
                out["parameters"] = int(_PARAMS.search(log).group(1))
            self.say(f"  {name}: {json.dumps(out[name])}")
        off = out["off"]["iteration_ms"]
        for name in ("algorithm1", "dense"):
            way = out[name]
            way["stall_ms"] = way["iteration_ms"] - off
            way["overhead_pct"] = 100.0 * way["stall_ms"] / off
        return out

    def exactness(self) -> dict:
        from megatron_moetion.testing.snapshot_check import check_run

        base = CPU_SMALL if self.cpu else GPU_SMALL
        run_dir = self.out / "runs" / "exactness"
        cfg = base.replace(moetion=True, window=3).with_flags(
            "--moetion-persist-dir", run_dir / "persist",
            "--moetion-debug-dump-dir", run_dir / "debug")
        self.run(cfg, "exactness")
        report = check_run(run_dir / "persist", run_dir / "debug")
        return {"model": _model(base), "window": 3, "ok": report.ok, "windows": report.windows,
                "items": report.items, "bytes": report.bytes, "problems": report.problems[:20]}

    def recovery(self) -> dict:
        if not self.cpu and torch.cuda.device_count() < 2:
            return {"status": "skipped",
                    "why": "in-memory recovery needs the failed rank's window on a buddy rank "
                           "(lose_state takes the rank's own host copies with it), and NCCL "
                           "refuses two ranks on one GPU: it needs two GPUs"}
        base = (CPU_SMALL if self.cpu else GPU_SMALL).replace(
            dp=2, ep=2, moetion=True, window=3, train_iters=10, deterministic=True, oracle=True)
        # every rank reports the recovery; rank 0's report is the one kept
        fault = "rank=1,iter=8,phase=bwd,kind=lose_state"
        twin, _ = self.run(base, "recovery_twin")
        faulty, _ = self.run(base.replace(fault_plan=fault), "recovery_fault")
        result = compare_dumps(twin / "oracle", faulty / "oracle")
        recs = [r for r in read_metrics(faulty / "metrics").get(0, [])
                if r.get("kind") == "recovery"]
        # the negative control: frozen operators left at their compute weights (MoC-style)
        # must end different, or the comparison could not have seen a wrong recovery
        control, _ = self.run(base.replace(fault_plan=fault).with_flags(
            "--moetion-negative-control", "skip_conversion"), "recovery_control")
        caught = not compare_dumps(twin / "oracle", control / "oracle").identical
        return {"status": "identical" if result.identical else "DIFFERENT", "fault": fault,
                "model": _model(base), "differences": [str(d) for d in
                                                      result.differences[:10]],
                "recoveries": len(recs),
                "recovery_s": _median([r.get("seconds") for r in recs]),
                "negative_control": "different (caught)" if caught else "IDENTICAL (missed)"}


def _model(cfg: RunConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("device", "num_layers", "hidden_size",
                                         "num_attention_heads", "seq_length",
                                         "micro_batch_size", "global_batch_size",
                                         "num_experts", "topk", "bf16", "dp", "ep")}


def _way(run_dir: Path, log: str, warm: int, peak_gbps: float | None) -> dict:
    times = iteration_times(log)
    measured = [ms for it, ms in sorted(times.items()) if it > warm]
    if not measured:
        raise RuntimeError(f"no iteration times after iteration {warm} in {run_dir}/log.txt")
    way = {"iteration_ms": statistics.median(measured), "iterations_timed": len(measured)}
    if not (run_dir / "metrics").exists():
        return way
    records = [r for r in read_metrics(run_dir / "metrics").get(0, [])
               if r.get("iteration", 0) > warm and "stall_ms" in r]
    if not records:
        return way
    first, last = records[0], records[-1]
    landed = (last.get("copy_bytes_landed") or 0) - (first.get("copy_bytes_landed") or 0)
    seconds = (last.get("copy_seconds_landed") or 0) - (first.get("copy_seconds_landed") or 0)
    gbps = landed / seconds / 1e9 if seconds > 0 else None
    way.update(
        moetion_stall_ms=_median([r["stall_ms"] for r in records]),
        snapshot_bytes_per_iter=_median([r.get("snapshot_bytes") for r in records]),
        window=_int(_median([r.get("window_size") for r in records])),
        window_binding=last.get("window_binding"),
        fwd_bwd_ms=_median([r.get("fwd_bwd_ms") for r in records]),
        copy_gbps=gbps,
        copy_share_of_peak=gbps / peak_gbps if gbps and peak_gbps else None)
    return way


def table(result: dict) -> str:
    """The README's table: each way's iteration time, overhead, W and copies."""
    ways = result["steps"].get("ways")
    if not ways:
        return "(no ways measured)"
    rows = ["| way | W | iteration (ms) | overhead vs off | snapshot GB / iter | copy GB/s "
            "(share of peak) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, label in (("off", "MoEtion off"), ("algorithm1", "MoEtion, W from Algorithm 1"),
                        ("dense", "dense in-memory snapshots (W = 1)")):
        w = ways.get(name, {})
        over = "" if name == "off" else f"{w.get('overhead_pct', float('nan')):+.2f}%"
        gb = w.get("snapshot_bytes_per_iter")
        bw = w.get("copy_gbps")
        share = w.get("copy_share_of_peak")
        rows.append(f"| {label} | {w.get('window') or '-'} | {w.get('iteration_ms', 0):.1f} | "
                    f"{over} | {'' if gb is None else f'{gb / 1e9:.2f}'} | "
                    f"{'' if bw is None else f'{bw:.1f} ({share:.0%})'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_moetion.bench.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (JSON and log)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="every step on the CPU with the tiny test model (timings mean nothing)")
    p.add_argument("--budget-s", type=float, default=330,
                   help="wall-clock budget for all runs together (default 330)")
    p.add_argument("--steps", default="peak,ways,exactness,recovery",
                   help="comma-separated steps to run (default: all)")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - {"peak", "ways", "exactness", "recovery"}
    if unknown:
        p.error(f"--steps: unknown {sorted(unknown)}; allowed peak, ways, exactness, recovery")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; --cpu-smoke runs the steps on the CPU",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.cpu_smoke, args.budget_s)
    t0 = time.monotonic()
    for name in steps:
        check.step(name, getattr(check, name))
    check.result["seconds"] = time.monotonic() - t0
    check.result["table"] = table(check.result)
    (args.out / "gpu_check.json").write_text(json.dumps(check.result, indent=1, default=str))
    check.say("\n" + check.result["table"])
    check.log.close()
    return 1 if check.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
