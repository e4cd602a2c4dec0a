"""Snapshot sizes, sparse window and host memory for real MoE configurations (pure arithmetic).

For a model on a parallel layout (a ``bench.presets.Preset``) this builds the operators one GPU
of each pipeline stage holds, with their real per-GPU byte counts, and reuses Algorithm 1
(``schedule.find_window`` / ``partition_for_window``) to size the sparse window. Per-GPU
figures are for the most loaded stage; per-node host memory assumes every GPU of the node is
that loaded (an upper bound). No torch, no process groups: numbers only.
Run ``python -m megatron_moetion.bench.calculator`` for the preset table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_moetion.bench.presets import PRESETS, ModelConfig, ParallelLayout, Preset, check_field
from megatron_moetion.operators import OperatorSpec, OpKind, order_operators
from megatron_moetion.schedule import partition_for_window, size_window

ACTIVE_BYTES_PER_PARAM = 12  # fp32 main weight + Adam m and v (PAPER.md 2.2)
FROZEN_BYTES_PER_PARAM = 2  # bf16 compute weight (PAPER.md 2.2)
LOG_BYTES_PER_ELEMENT = 2  # bf16 boundary activations and gradients
LOCAL_WINDOWS = 3  # capturing, shipped (in flight), persisted
REPLICA_WINDOWS = 2  # per owner: persisted + in flight (PAPER.md 2.3)


def estimate_fwd_bwd_s(p: Preset) -> float:
    """6 * active params * tokens per iteration / (GPUs * peak * MFU); attention scores ignored."""
    tokens = p.seq_len * p.micro_batch_size * p.micro_batches * p.layout.dp
    flops = 6.0 * p.model.active_params * tokens
    return flops / (p.layout.world * p.gpu_peak_tflops * 1e12 * p.mfu)


def stage_layers(model: ModelConfig, pp: int) -> list[range]:
    """1-based layers per stage; the first ``num_layers % pp`` stages take one extra."""
    base, extra = divmod(model.num_layers, pp)
    out, start = [], 1
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stage_operators(model: ModelConfig, layout: ParallelLayout, stage: int) -> list[OperatorSpec]:
    """Operators one GPU of ``stage`` holds, in capture order (EP rank 0's experts; the other
    EP ranks' are the same size). With the distributed optimizer, expert state is sharded over
    the expert data-parallel group (dp / ep, as Megatron does) and everything else over dp;
    frozen bf16 bytes are divided the same way, each DP rank capturing its own slice."""
    opt = layout.distributed_optimizer
    shard, expert_shard = (layout.dp, layout.expert_dp) if opt else (1, 1)

    def op(name: str, kind: OpKind, layer: int | None, eid: int | None, params: float,
           div: int) -> OperatorSpec:
        p = int(round(params))
        return OperatorSpec(name, kind, layer, eid, p,
                            math.ceil(ACTIVE_BYTES_PER_PARAM * p / div),
                            math.ceil(FROZEN_BYTES_PER_PARAM * p / div))

    tp, h = layout.tp, model.hidden_size
    ops: list[OperatorSpec] = []
    if stage == 0:
        ops.append(op("embedding", OpKind.EMBEDDING, None, None, model.embedding_params / tp,
                      shard))
    for layer in stage_layers(model, layout.pp)[stage]:
        non_expert = model.attention_params_per_layer / tp + 2 * h
        if model.is_moe(layer):
            non_expert += model.shared_params / tp
            for e in range(model.num_experts // layout.ep):
                ops.append(op(f"layer{layer}.expert{e}", OpKind.EXPERT, layer, e,
                              model.expert_params / tp, expert_shard))
            ops.append(op(f"layer{layer}.router", OpKind.ROUTER, layer, None,
                          model.router_params, shard))
        else:
            non_expert += model.mlp_params_dense / tp
        ops.append(op(f"layer{layer}.non_expert", OpKind.NON_EXPERT, layer, None, non_expert,
                      shard))
    if stage == layout.pp - 1:
        for d in range(model.mtp_layers):  # Megatron puts the MTP modules on the last stage
            layer = model.num_layers + 1 + d
            for e in range(model.num_experts // layout.ep):
                ops.append(op(f"mtp{d}.expert{e}", OpKind.EXPERT, layer, e,
                              model.expert_params / tp, expert_shard))
            ops.append(op(f"mtp{d}.router", OpKind.ROUTER, layer, None, model.router_params,
                          shard))
            rest = (model.mtp_params_per_module - model.num_experts * model.expert_params
                    - model.router_params)
            ops.append(op(f"mtp{d}.non_expert", OpKind.NON_EXPERT, layer, None, rest / tp,
                          shard))
        ops.append(op("output", OpKind.OUTPUT, None, None, model.embedding_params / tp + h,
                      shard))
    return order_operators(ops)


@dataclass(frozen=True)
class CalcResult:
    """Per-GPU (most loaded stage) and per-node figures for one preset. Bytes unless noted.

    ``copy_gbps`` and ``network_gbps`` are one GPU's shares (GB/s); ``binding`` is what set W
    (``schedule.WindowChoice.binding``), ``copy_window`` the W the copy budget alone needs,
    ``replication_s`` the seconds a window's replication to r buddies takes of W iterations.
    """

    name: str
    layout: str
    total_params: int
    params_per_gpu: int
    dense_bytes_per_gpu: int
    fwd_bwd_s: float
    copy_gbps: float
    network_gbps: float
    window: int
    binding: str
    copy_window: int
    fits: bool
    replication_s: float
    slot_mean_bytes: float
    slot_max_bytes: int
    window_bytes: int
    node_snapshot_bytes: int
    node_replica_bytes: int
    node_log_bytes: int
    node_dense_bytes: int

    @property
    def bandwidth_gbps(self) -> float:
        return self.copy_gbps

    @property
    def dense_copy_s(self) -> float:
        return self.dense_bytes_per_gpu / (self.copy_gbps * 1e9)

    @property
    def dense_replication_s(self) -> float:
        """Seconds to send a dense snapshot (W = 1) to one buddy at this GPU's network share."""
        return self.dense_bytes_per_gpu / (self.network_gbps * 1e9)

    @property
    def node_moetion_bytes(self) -> int:
        return self.node_snapshot_bytes + self.node_replica_bytes + self.node_log_bytes


def compute(p: Preset, *, bandwidth_gbps: float | None = None, network_gbps: float | None = None,
            fwd_bwd_s: float | None = None, window: int | None = None,
            replication: int = 2) -> CalcResult:
    """Window, slot bytes and host memory of ``p``.

    Args:
        p: the preset.
        bandwidth_gbps: one GPU's device-to-host bandwidth in GB/s (1e9 bytes/s); None takes
            the preset's share of its PCIe switch (``Preset.copy_gbps_per_gpu``).
        network_gbps: the node's network bandwidth in GB/s, shared by its GPUs; None takes the
            preset's ``nic_gbps``.
        fwd_bwd_s: forward+backward time per iteration; None uses ``estimate_fwd_bwd_s``.
        window: force W (every stage partitioned into W slots); None sizes it with
            ``schedule.size_window`` per stage (copy and replication budgets) and takes the
            world-wide maximum, as the runtime's agreement does.
        replication: buddies r holding copies of each window (paper default 2).

    Raises:
        ConfigError: a non-positive bandwidth, time or window, or a negative replication.
    """
    copy = p.copy_gbps_per_gpu if bandwidth_gbps is None else bandwidth_gbps
    nic = p.nic_gbps if network_gbps is None else network_gbps
    check_field("compute", "bandwidth_gbps", copy, copy > 0, "> 0")
    check_field("compute", "network_gbps", nic, nic > 0, "> 0")
    check_field("compute", "replication", replication, replication >= 0, ">= 0")
    if window is not None:
        check_field("compute", "window", window, window >= 1, ">= 1 or None")
    fb = estimate_fwd_bwd_s(p) if fwd_bwd_s is None else fwd_bwd_s
    check_field("compute", "fwd_bwd_s", fb, fb > 0, "> 0")
    lay = p.layout
    net = nic / lay.gpus_per_node
    stages = [stage_operators(p.model, lay, s) for s in range(lay.pp)]
    choices = [size_window(ops, copy_bytes_per_s=copy * 1e9, fwd_bwd_s=fb,
                           network_bytes_per_s=net * 1e9, replicas=replication)
               for ops in stages]
    deciding = max(choices, key=lambda c: c.window)
    w = window or deciding.window
    loaded = max(stages, key=lambda ops: sum(o.active_bytes for o in ops))
    sched = partition_for_window(loaded, w, copy * 1e9 * fb)
    dense = sum(o.active_bytes for o in loaded)
    win_bytes = sum(sched.slot_bytes)
    rep_s = replication * win_bytes / (net * 1e9)
    directions = 0 if lay.pp == 1 else 2  # middle stages send activations and gradients
    # Boundary tensors are split over TP: Megatron needs sequence parallelism for MoE with TP.
    act = p.seq_len * p.micro_batch_size * p.model.hidden_size * LOG_BYTES_PER_ELEMENT / lay.tp
    logs = directions * act * p.micro_batches * 2 * w
    g = lay.gpus_per_node
    return CalcResult(
        name=p.model.name, layout=lay.describe(), total_params=p.model.total_params,
        params_per_gpu=sum(o.num_params for o in loaded), dense_bytes_per_gpu=dense,
        fwd_bwd_s=fb, copy_gbps=copy, network_gbps=net, window=w,
        binding="forced" if window else deciding.binding, copy_window=deciding.copy_window,
        fits=sched.fits and rep_s <= w * fb, replication_s=rep_s,
        slot_mean_bytes=win_bytes / w, slot_max_bytes=sched.max_slot_bytes,
        window_bytes=win_bytes,
        node_snapshot_bytes=g * LOCAL_WINDOWS * win_bytes,
        node_replica_bytes=g * replication * REPLICA_WINDOWS * win_bytes,
        node_log_bytes=int(g * logs),
        node_dense_bytes=g * (1 + replication) * dense)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(rows: Sequence[CalcResult]) -> str:
    """Markdown table of ``compute`` results (GB = 1e9 bytes; bandwidths per GPU; host memory
    per node)."""
    head = ("| model | layout | params (B) | params/GPU (M) | fwd+bwd s | copy GB/s | net GB/s "
            "| dense/GPU GB | dense copy s | W | binding | W copy only | replication s "
            "| slot mean GB | slot max GB | max/dense | window/dense | node snaps GB "
            "| node replicas GB | node logs GB | node MoEtion GB | node dense GB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        w = f"{r.window}" + ("" if r.fits else " (stalls)")
        lines.append(
            f"| {r.name} | {r.layout} | {r.total_params / 1e9:.1f} | "
            f"{r.params_per_gpu / 1e6:.0f} | {r.fwd_bwd_s:.2f} | {r.copy_gbps:.3g} | "
            f"{r.network_gbps:.3g} | {_gb(r.dense_bytes_per_gpu)} | {r.dense_copy_s:.3f} | "
            f"{w} | {r.binding} | {r.copy_window} | {r.replication_s:.2f} of "
            f"{r.window * r.fwd_bwd_s:.2f} | {_gb(r.slot_mean_bytes)} | "
            f"{_gb(r.slot_max_bytes)} | {r.slot_max_bytes / r.dense_bytes_per_gpu:.2f} | "
            f"{r.window_bytes / r.dense_bytes_per_gpu:.2f} | {_gb(r.node_snapshot_bytes)} | "
            f"{_gb(r.node_replica_bytes)} | {_gb(r.node_log_bytes)} | "
            f"{_gb(r.node_moetion_bytes)} | {_gb(r.node_dense_bytes)} |")
    return "\n".join(lines)


def binding_lines(rows: Sequence[CalcResult]) -> list[str]:
    """One line per preset: W and the constraint that set it."""
    out = []
    for r in rows:
        fit = "" if r.fits else "; does NOT fit: snapshots or replication fall behind"
        out.append(f"{r.name}: W={r.window}, binding constraint {r.binding} (copy alone: "
                   f"W={r.copy_window} at {r.copy_gbps:.3g} GB/s per GPU; replication to the "
                   f"buddies {r.replication_s:.2f} s of {r.window * r.fwd_bwd_s:.2f} s at "
                   f"{r.network_gbps:.3g} GB/s per GPU){fit}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print W and its binding constraint per preset, the preset table with W sized by
    ``schedule.size_window`` (each preset's own PCIe and network bandwidths unless overridden),
    then the same at W = 3 (the paper's window) unless ``--window`` is given. fwd+bwd
    defaults to each preset's FLOPs estimate (``estimate_fwd_bwd_s``: 4096-token sequences,
    2*pp micro-batches of 1 per DP replica, 30% MFU; all assumed)."""
    ap = argparse.ArgumentParser(prog="python -m megatron_moetion.bench.calculator")
    ap.add_argument("--bandwidth-gbps", type=float, default=None,
                    help="device-to-host GB/s per GPU (default: each preset's PCIe share)")
    ap.add_argument("--network-gbps", type=float, default=None,
                    help="network GB/s per node (default: each preset's NICs)")
    ap.add_argument("--fwd-bwd-s", type=float, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--replication", type=int, default=2)
    a = ap.parse_args(argv)
    windows = [a.window] if a.window else [None, 3]
    for w in windows:
        rows = [compute(p, bandwidth_gbps=a.bandwidth_gbps, network_gbps=a.network_gbps,
                        fwd_bwd_s=a.fwd_bwd_s, window=w, replication=a.replication)
                for p in PRESETS.values()]
        sized = f"W = {w}" if w else "W sized by copy and replication budgets (size_window)"
        print(f"\n{sized}, r = {a.replication}\n")
        if not w:
            print("\n".join(binding_lines(rows)) + "\n")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
