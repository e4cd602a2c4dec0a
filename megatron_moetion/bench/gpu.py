"""GPU measurements that only a GPU shows (``scripts/bench_gpu.sh``): torch only, no Megatron.

1. Device-to-host copy bandwidth into pinned and into pageable memory, by size.
2. Snapshot stall on a training loop with a few GB of state: an MLP stack in bf16 with FP32
   main weights and Adam state (12 bytes per parameter of optimizer state), trained for some
   iterations four ways: no snapshots; MoEtion's snapshot engine dense (W=1: every operator's
   main weights and Adam state each iteration) and sparse (W=3: a third in full, the rest's
   bf16 compute weights), both copied on a side stream while the next forward and backward
   run; and a synchronous copy of the dense snapshot (no overlap) for reference. The stall is
   the iteration time over the no-snapshot run's; the overlap is the share of the copy time
   that the stall does not show.

Writes one JSON file. ``--cpu-smoke`` runs a tiny size on the CPU to check the code paths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megatron_moetion.operators import OperatorSpec, OpKind
from megatron_moetion.schedule import partition_for_window
from megatron_moetion.snapshot import CaptureItem, SnapshotEngine, WindowLayout


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sync_training_stream(device):
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def copy_bandwidth(device, sizes_mb=(64, 256, 1024), repeats=5) -> list[dict]:
    out = []
    for mb in sizes_mb:
        n = mb << 20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        for pinned in (True, False):
            dst = torch.empty(n, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=pinned)
                _sync(device)
                times.append(time.perf_counter() - t0)
            out.append({"mb": mb, "pinned": pinned, "gb_per_s": n / statistics.median(times) / 1e9})
        del src
    return out


class Model(torch.nn.Module):
    def __init__(self, layers: int, hidden: int, ffn: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, ffn, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(ffn, hidden, bias=False))
            for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def build(device, layers, hidden, ffn):
    """bf16 compute weights, FP32 main weights stepped by Adam (mixed precision by hand)."""
    model = Model(layers, hidden, ffn).to(device=device, dtype=torch.bfloat16)
    mains = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.Adam(mains, lr=1e-4, fused=device.type == "cuda")
    return model, mains, opt


def forward_backward(model, x):
    model(x).float().pow(2).mean().backward()


def optimizer_step(model, mains, opt):
    """Adam on the FP32 main weights, then the bf16 compute weights copied from them."""
    for p, m in zip(model.parameters(), mains):
        m.grad = p.grad.float()
        p.grad = None
    opt.step()
    with torch.no_grad():
        for p, m in zip(model.parameters(), mains):
            p.copy_(m)


def capture_plan(model, mains, opt, window: int):
    """Operators = blocks; ACTIVE items: main + Adam moments; FROZEN: bf16 weights."""
    params = list(model.parameters())
    ops = []
    for b in range(len(model.blocks)):
        idx = (2 * b, 2 * b + 1)
        active = [CaptureItem(f"b{b}.{i}.{k}", f"b{b}", "active", t.view(-1))
                  for i in idx for k, t in (("main", mains[i]),
                                            ("exp_avg", opt.state[mains[i]]["exp_avg"]),
                                            ("exp_avg_sq", opt.state[mains[i]]["exp_avg_sq"]))]
        frozen = [CaptureItem(f"b{b}.{i}.w", f"b{b}", "frozen", params[i].detach().view(-1))
                  for i in idx]
        nbytes = sum(i.source.numel() * i.source.element_size() for i in active)
        fbytes = sum(i.source.numel() * i.source.element_size() for i in frozen)
        ops.append((OperatorSpec(f"b{b}", OpKind.EXPERT, b, b, 0, nbytes, fbytes), active,
                    frozen))
    schedule = partition_for_window([o[0] for o in ops], window)
    by = {o[0].name: o for o in ops}
    slots = []
    for k in range(window):
        items = [i for n in schedule.active(k) for i in by[n][1]]
        items += [i for n in schedule.frozen(k) for i in by[n][2]]
        slots.append(items)
    return slots


def run_loop(device, iters, layers, hidden, ffn, tokens, mode: str, window: int = 3) -> dict:
    torch.manual_seed(0)
    model, mains, opt = build(device, layers, hidden, ffn)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    forward_backward(model, x)
    optimizer_step(model, mains, opt)  # Adam state exists from here on
    engine = SnapshotEngine(device) if mode != "none" else None
    w = 1 if mode in ("dense", "dense_sync") else window
    slots = capture_plan(model, mains, opt, w) if engine else None
    layout = WindowLayout.build(slots) if engine else None
    times, copied, win = [], [], None
    warmup = 2
    for it in range(iters):
        if it == warmup:
            _sync(device)
            t_steady = time.perf_counter()
        _sync_training_stream(device)
        t0 = time.perf_counter()
        if engine and (win is None or it % w == 0):
            if win is not None:
                engine.release(win)
            win = engine.begin_window(it, it, layout, {})
        forward_backward(model, x)
        if engine:
            engine.wait_for_copies()  # the previous snapshot must land before the step
        optimizer_step(model, mains, opt)
        if engine:
            copied.append(engine.capture(win, it % w, slots[it % w], {}))
            if mode == "dense_sync":
                engine.synchronize()
        # Only the training stream: a full device sync here would wait for the side-stream
        # copy and hide any overlap.
        _sync_training_stream(device)
        times.append(time.perf_counter() - t0)
    _sync(device)
    steady_ms = (time.perf_counter() - t_steady) / (iters - warmup) * 1e3
    state_bytes = sum(m.numel() * 12 for m in mains)
    # iter_ms: wall time per iteration over the steady iterations, every copy landed at the
    # end; iter_ms_median: median of single iterations timed on the training stream.
    return {"mode": mode, "iter_ms": steady_ms,
            "iter_ms_median": statistics.median(times[warmup:]) * 1e3,
            "bytes_per_iter": statistics.median(copied) if copied else 0,
            "state_bytes": state_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_moetion.bench.gpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, shape, iters, sizes = torch.device("cpu"), (2, 64, 128, 32), 5, (1,)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: no CUDA device; use --cpu-smoke to check the code")
        # 24 blocks of 2 x 4096 x 4096: 805M parameters, 9.7 GB of FP32 + Adam state
        device, shape, iters, sizes = torch.device("cuda"), (24, 4096, 4096, 8192), 20, (
            64, 256, 1024)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "bandwidth": copy_bandwidth(device, sizes), "loops": []}
    for mode in ("none", "dense", "sparse", "dense_sync"):
        result["loops"].append(run_loop(device, iters, *shape, mode))
        print(json.dumps(result["loops"][-1]), flush=True)
    base = result["loops"][0]["iter_ms"]
    bw = max(b["gb_per_s"] for b in result["bandwidth"] if b["pinned"]) * 1e9
    for loop in result["loops"][1:]:
        loop["stall_ms"] = loop["iter_ms"] - base
        copy_ms = loop["bytes_per_iter"] / bw * 1e3
        loop["copy_ms_at_peak_bandwidth"] = copy_ms
        loop["overlap_share"] = max(0.0, 1 - loop["stall_ms"] / copy_ms) if copy_ms else None
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
