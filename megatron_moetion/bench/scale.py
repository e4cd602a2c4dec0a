"""Coordination at scale, simulated without processes: 1k, 4k and 16k ranks.

Layouts: DeepSeek-V3's (``presets.DEEPSEEK_V3``: TP1 PP16 EP64, 8 GPUs per node) scaled by DP
(DP 64, 256, 1024), Megatron's rank order ``tp-cp-ep-dp-pp`` (with TP1: rank = dp + DP * stage,
so one node's 8 ranks are 8 DP ranks of one stage), racks of ``NODES_PER_RACK`` nodes. For each:

- agreement: bytes per iteration and an alpha-beta latency, as a share of the iteration time
  (``calculator.estimate_fwd_bwd_s``), for the first design (``dist.all_reduce`` of
  ``world + 3`` int64, which gloo runs as a ring) and the current one (``agreement.py``: 4
  int64 by recursive doubling, the per-rank flags only when a rank lost state);
- store: heartbeat ops/s on the one rendezvous store (ops per tick counted by running the real
  ``Liveness.tick`` on a counting store; the default interval from ``MoEtionConfig``) against a
  store capacity, and the detection time;
- planner: the real ``Topology`` and ``plan_recovery`` on full-size synthetic holdings with one
  node's ranks failed, timed (median of ``repeats``);
- buddies: the real buddy assignment, checked for other-node and other-rack copies;
- host memory per node: ``calculator.compute``.

``python -m megatron_moetion.bench.scale`` prints the table and writes ``docs/scale.md`` (the
table) and ``docs/img/scale.png``. Numbers are sourced in comments or marked assumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_moetion.agreement import HEAD, max_rounds
from megatron_moetion.bench.calculator import compute, estimate_fwd_bwd_s
from megatron_moetion.bench.presets import DEEPSEEK_V3, Preset, check_field
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.liveness import STORE_BUDGET_OPS_S, Liveness, scaled_interval
from megatron_moetion.recovery_plan import Holdings, plan_recovery
from megatron_moetion.topology import RankInfo, Topology, rack_order

WORLDS = (1024, 4096, 16384)
NODES_PER_RACK = 4  # assumed: a ~40 kW rack holds four DGX H100 (10.2 kW each, DGX datasheet)
ALPHA_S = 25e-6  # assumed: one gloo message step over kernel TCP in a datacenter network
BANDWIDTH_BPS = 2.5e9  # assumed: one gloo TCP connection on a 25-100 GbE front-end link
INT64 = 8
# Measured here (torch 2.13 libuv TCPStore, 16 client threads in 2 processes on the same 2 CPUs
# as the server: 54k ops/s; 1 process x 4 threads: 48k), rounded down. A dedicated core may do
# about twice; ``--measure-store`` re-measures on the machine it runs on.
STORE_CAPACITY_OPS_S = 50_000.0
BEFORE_OPS_PER_TICK = 5  # Liveness.tick before the fix: one write, four reads (counted)
STORE_SAFE_UTILISATION = 0.5  # assumed: queueing delay doubles at 50% load (M/M/1)
STORE_OP_S = 100e-6  # assumed: one store round trip over the network (38 us measured loopback)
AGREEMENT_BUDGET = 0.01  # assumed: the agreement may cost at most 1% of an iteration
PLANNER_BUDGET_S = 1.0  # assumed: planning may take at most 1 s of a recovery


@dataclass(frozen=True)
class ScaleRow:
    """One world size; seconds and bytes unless noted."""

    world: int
    nodes: int
    racks: int
    layout: str
    iteration_s: float
    agree_bytes_before: int
    agree_bytes_after: int
    agree_bytes_after_failure: int  # the rare iteration where a rank lost state
    agree_s_before: float
    agree_s_after: float
    agree_s_after_failure: float
    store_ops_per_tick: float  # after: counted on the real Liveness.tick
    heartbeat_interval_s: float  # after: liveness.scaled_interval
    store_ops_s: float
    store_utilisation: float
    detection_s: float
    declare_scan_s: float
    store_ops_s_before: float  # BEFORE_OPS_PER_TICK at the configured interval
    store_utilisation_before: float
    detection_s_before: float
    topology_s: float
    plan_s: float
    plan_transfers: int
    replaying: int
    buddies_other_node: float  # fraction of buddy copies on another node
    buddies_other_rack: float  # fraction on another rack
    ranks_lost_on_rack_failure: float  # fraction whose every copy is in its own rack
    buddies_other_rack_after: float  # the same with --moetion-rack-id (topology.rack_order)
    ranks_lost_on_rack_failure_after: float
    node_moetion_gb: float
    node_dense_gb: float

    @property
    def agree_share_before(self) -> float:
        return self.agree_s_before / self.iteration_s

    @property
    def agree_share_after(self) -> float:
        return self.agree_s_after / self.iteration_s


def scaled_preset(world: int, base: Preset = DEEPSEEK_V3) -> Preset:
    """``base`` with DP chosen so that tp * pp * dp == ``world``."""
    lay = base.layout
    per_replica = lay.tp * lay.pp
    check_field("scaled_preset", "world", world, world % per_replica == 0 and world > 0,
                f"a positive multiple of tp * pp ({per_replica})")
    return dataclasses.replace(base, layout=dataclasses.replace(lay, dp=world // per_replica))


def rank_table(preset: Preset) -> list[RankInfo]:
    """RankInfo per rank, Megatron order tp-cp-ep-dp-pp (PP outermost), consecutive ranks on a
    node. Requires TP1 (DeepSeek-V3's)."""
    lay = preset.layout
    check_field("rank_table", "tp", lay.tp, lay.tp == 1, "1 (the modelled layout)")
    return [RankInfo(r, r // lay.dp, r // lay.gpus_per_node,
                     tuple(r % lay.dp + lay.dp * s for s in range(lay.pp)))
            for r in range(lay.world)]


def ring_allreduce_s(world: int, nbytes: int, alpha: float = ALPHA_S,
                     bandwidth: float = BANDWIDTH_BPS) -> float:
    """Ring all-reduce (gloo's default): 2 (p-1) steps, each rank moving 2 (p-1)/p of the
    bytes."""
    if world <= 1:
        return 0.0
    return 2 * (world - 1) * alpha + 2 * (world - 1) / world * nbytes / bandwidth


def doubling_allreduce_s(world: int, nbytes: int, alpha: float = ALPHA_S,
                         bandwidth: float = BANDWIDTH_BPS) -> float:
    """Recursive doubling (``agreement.allreduce_max``): every step moves the whole vector."""
    return max_rounds(world) * (alpha + nbytes / bandwidth)


class CountingStore:
    """In-memory ``Store`` subset ``Liveness`` uses, counting round trips."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.ops = 0
        self.lock = threading.Lock()

    def set(self, key, value):
        self.ops += 1
        self.data[key] = value

    def get(self, key):
        self.ops += 1
        return self.data[key].encode()

    def add(self, key, amount):
        self.ops += 1
        self.data[key] = str(int(self.data.get(key, "0")) + amount)
        return int(self.data[key])

    def check(self, keys):
        self.ops += 1
        return all(k in self.data for k in keys)

    def compare_set(self, key, expected, desired):
        self.ops += 1
        current = self.data.get(key, "")
        if current == expected:
            self.data[key] = desired
            return desired.encode()
        return current.encode()


def liveness_ops_per_tick(world: int = 4, ticks: int = 5) -> float:
    """Store round trips per rank per heartbeat in steady state, counted on the real code."""
    store = CountingStore()
    ranks = [Liveness(store, r, world, 1.0, 30.0, lambda v: None) for r in range(world)]
    for _ in range(2):  # set-up ticks: peer search, first sight of each heartbeat key
        for lv in ranks:
            lv.tick()
    store.ops = 0
    for _ in range(ticks):
        for lv in ranks:
            lv.tick()
    return store.ops / (ticks * world)


def measure_store_ops_s(threads: int = 4, seconds: float = 2.0) -> float:
    """Ops/s a local libuv TCPStore serves to ``threads`` clients doing heartbeat ticks."""
    from datetime import timedelta

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    counts = [0] * threads

    def loop(i: int) -> None:
        s = dist.TCPStore("127.0.0.1", server.port, is_master=False,
                          timeout=timedelta(seconds=30))
        key, value, n = f"hb/{i}", "x" * 120, 0
        s.set(key, value)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.set(key, value)
            s.check(["failure"])
            s.check(["done/0"])
            s.check([key])
            s.get(key)
            n += 5
        counts[i] = n

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def synthetic_holdings(topology: Topology, failed: Sequence[int], window: int = 3,
                       fault_iteration: int = 34) -> dict[int, Holdings]:
    """Every survivor holds its two newest windows, its owners' copies of them and logs
    covering the replay; failed ranks hold nothing."""
    lost = set(failed)
    spans = {fault_iteration // window - 2: ((fault_iteration // window - 2) * window, window),
             fault_iteration // window - 1: ((fault_iteration // window - 1) * window, window)}
    logs = {k: (fault_iteration - 3 * window, fault_iteration)
            for k in ("fwd", "bwd", "data", "record")}
    out = {}
    for r in range(topology.world_size):
        if r in lost:
            out[r] = Holdings(r, True)
        else:
            out[r] = Holdings(r, False, windows=dict(spans),
                              replicas={o: dict(spans) for o in topology.owners(r)},
                              logs=dict(logs))
    return out


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def buddy_placement(topology: Topology, nodes_per_rack: int,
                    rack_of: dict[int, int] | None = None) -> tuple[float, float, float]:
    """(other-node fraction, other-rack fraction, fraction of ranks with every copy in their
    own rack: a rack failure loses their state). ``rack_of``: node index -> rack (default
    ``node // nodes_per_rack``, nodes numbered rack by rack)."""
    def rack(node: int) -> int:
        return rack_of[node] if rack_of is not None else node // nodes_per_rack

    copies = other_node = other_rack = all_in_rack = 0
    for r in range(topology.world_size):
        node = topology.infos[r].node
        buddies = topology.buddies(r)
        racks = [rack(topology.infos[b].node) for b in buddies]
        copies += len(buddies)
        other_node += sum(topology.infos[b].node != node for b in buddies)
        other_rack += sum(k != rack(node) for k in racks)
        all_in_rack += bool(buddies) and all(k == rack(node) for k in racks)
    return (other_node / max(copies, 1), other_rack / max(copies, 1),
            all_in_rack / topology.world_size)


def rack_aware(infos: Sequence[RankInfo],
               nodes_per_rack: int) -> tuple[list[RankInfo], dict[int, int]]:
    """The same ranks with node indices in ``topology.rack_order`` (what ``--moetion-rack-id``
    gives the runtime), and the rack of each new node index."""
    nodes = sorted({i.node for i in infos})
    order = rack_order({f"{n:08d}": f"{n // nodes_per_rack:08d}" for n in nodes})
    position = {int(name): p for p, name in enumerate(order)}
    return ([RankInfo(i.rank, i.stage, position[i.node], i.pipeline) for i in infos],
            {position[n]: n // nodes_per_rack for n in nodes})


def simulate_world(world: int, *, replication: int = 2, nodes_per_rack: int = NODES_PER_RACK,
                   repeats: int = 3, ops_per_tick: float | None = None,
                   store_capacity_ops_s: float = STORE_CAPACITY_OPS_S) -> ScaleRow:
    """One row of the table (see module docstring)."""
    check_field("simulate_world", "nodes_per_rack", nodes_per_rack, nodes_per_rack >= 1, ">= 1")
    check_field("simulate_world", "repeats", repeats, repeats >= 1, ">= 1")
    preset = scaled_preset(world)
    lay = preset.layout
    cfg = MoEtionConfig()
    iteration_s = estimate_fwd_bwd_s(preset)
    nodes = world // lay.gpus_per_node

    before_bytes = (world + 3) * INT64
    after_bytes = HEAD * INT64
    failure_bytes = after_bytes + world * INT64

    ops = liveness_ops_per_tick() if ops_per_tick is None else ops_per_tick
    interval = scaled_interval(cfg.heartbeat_interval_s, world)
    store_ops_s = world * ops / interval
    before_ops_s = world * BEFORE_OPS_PER_TICK / cfg.heartbeat_interval_s
    # the watcher notices on its next tick after the timeout, scans every heartbeat (about two
    # round trips per rank, one after another), publishes; every rank reads it on its next tick
    declare_scan_s = 2 * world * STORE_OP_S
    detection_s = cfg.detect_timeout_s + interval + declare_scan_s + interval
    detection_before = cfg.detect_timeout_s + 2 * cfg.heartbeat_interval_s + declare_scan_s

    infos = rank_table(preset)
    topology_s, topology = _median_time(
        lambda: _built(Topology(infos, replication)), repeats)
    mid = nodes // 2
    failed = [r for r in range(world) if infos[r].node == mid]
    holdings = synthetic_holdings(topology, failed)
    plan_s, plan = _median_time(lambda: plan_recovery(topology, failed, 34, holdings), repeats)
    if plan.fallback:
        raise RuntimeError(f"synthetic plan fell back at {world} ranks: {plan.reason}")
    other_node, other_rack, lost_on_rack = buddy_placement(topology, nodes_per_rack)
    aware_infos, rack_of = rack_aware(infos, nodes_per_rack)
    _, rack_after, lost_after = buddy_placement(Topology(aware_infos, replication),
                                                nodes_per_rack, rack_of)
    calc = compute(preset, replication=replication)
    return ScaleRow(
        world=world, nodes=nodes, racks=-(-nodes // nodes_per_rack), layout=lay.describe(),
        iteration_s=iteration_s, agree_bytes_before=before_bytes, agree_bytes_after=after_bytes,
        agree_bytes_after_failure=failure_bytes,
        agree_s_before=ring_allreduce_s(world, before_bytes),
        agree_s_after=doubling_allreduce_s(world, after_bytes),
        agree_s_after_failure=(doubling_allreduce_s(world, after_bytes)
                               + doubling_allreduce_s(world, world * INT64)),
        store_ops_per_tick=ops, heartbeat_interval_s=interval, store_ops_s=store_ops_s,
        store_utilisation=store_ops_s / store_capacity_ops_s, detection_s=detection_s,
        store_ops_s_before=before_ops_s,
        store_utilisation_before=before_ops_s / store_capacity_ops_s,
        detection_s_before=detection_before,
        declare_scan_s=declare_scan_s, topology_s=topology_s, plan_s=plan_s,
        plan_transfers=len(plan.transfers), replaying=len(plan.replaying),
        buddies_other_node=other_node, buddies_other_rack=other_rack,
        ranks_lost_on_rack_failure=lost_on_rack, buddies_other_rack_after=rack_after,
        ranks_lost_on_rack_failure_after=lost_after,
        node_moetion_gb=calc.node_moetion_bytes / 1e9, node_dense_gb=calc.node_dense_bytes / 1e9)


def _built(topology: Topology) -> Topology:
    """The set-up cost includes every rank's ``owners`` (each rank asks for its own)."""
    topology.owners(0)
    return topology


def simulate(worlds: Sequence[int] = WORLDS, **kwargs) -> list[ScaleRow]:
    ops = kwargs.pop("ops_per_tick", None)
    ops = liveness_ops_per_tick() if ops is None else ops
    return [simulate_world(w, ops_per_tick=ops, **kwargs) for w in worlds]


def breaks_first(rows: Sequence[ScaleRow]) -> list[str]:
    """What crosses its budget, smallest world first (before the agreement redesign)."""
    out = []
    for r in rows:
        if r.agree_share_before > AGREEMENT_BUDGET:
            out.append(f"{r.world} ranks: agreement (ring) {100 * r.agree_share_before:.1f}% "
                       f"of the iteration > {100 * AGREEMENT_BUDGET:.0f}%")
        if r.store_utilisation_before > STORE_SAFE_UTILISATION:
            out.append(f"{r.world} ranks: heartbeat store load "
                       f"{100 * r.store_utilisation_before:.0f}% of capacity > "
                       f"{100 * STORE_SAFE_UTILISATION:.0f}% "
                       f"({100 * r.store_utilisation:.0f}% after)")
        if r.plan_s > PLANNER_BUDGET_S or r.topology_s > PLANNER_BUDGET_S:
            out.append(f"{r.world} ranks: planning {r.plan_s:.2f} s / topology "
                       f"{r.topology_s:.2f} s > {PLANNER_BUDGET_S:g} s")
        if r.ranks_lost_on_rack_failure > 0:
            out.append(f"{r.world} ranks: a rack failure loses every copy of "
                       f"{100 * r.ranks_lost_on_rack_failure:.0f}% of ranks (buddies not "
                       f"rack-aware; {100 * r.ranks_lost_on_rack_failure_after:.0f}% with "
                       f"--moetion-rack-id)")
    return out


def format_table(rows: Sequence[ScaleRow]) -> str:
    """Markdown table, one column per world size."""
    def ms(s: float) -> str:
        return f"{1e3 * s:.2f}"

    fields = [
        ("layout", lambda r: r.layout),
        ("nodes / racks", lambda r: f"{r.nodes} / {r.racks}"),
        ("iteration s (FLOPs estimate)", lambda r: f"{r.iteration_s:.2f}"),
        ("agreement bytes, before (ring, world+3)", lambda r: f"{r.agree_bytes_before:,}"),
        ("agreement bytes, after (doubling, 4)", lambda r: f"{r.agree_bytes_after}"),
        ("agreement ms, before", lambda r: ms(r.agree_s_before)),
        ("agreement ms, after", lambda r: ms(r.agree_s_after)),
        ("agreement ms, after, iteration with a failure",
         lambda r: ms(r.agree_s_after_failure)),
        ("agreement % of iteration, before", lambda r: f"{100 * r.agree_share_before:.2f}"),
        ("agreement % of iteration, after", lambda r: f"{100 * r.agree_share_after:.4f}"),
        ("store ops per rank per heartbeat, before / after (counted)",
         lambda r: f"{BEFORE_OPS_PER_TICK:g} / {r.store_ops_per_tick:g}"),
        ("heartbeat interval s, after (scaled_interval)",
         lambda r: f"{r.heartbeat_interval_s:.2f}"),
        ("store ops/s, before / after",
         lambda r: f"{r.store_ops_s_before:,.0f} / {r.store_ops_s:,.0f}"),
        ("store load, % of capacity, before / after",
         lambda r: f"{100 * r.store_utilisation_before:.0f} / {100 * r.store_utilisation:.0f}"),
        ("declare scan s", lambda r: f"{r.declare_scan_s:.2f}"),
        ("detection s (timeout + 2 intervals + scan), before / after",
         lambda r: f"{r.detection_s_before:.1f} / {r.detection_s:.1f}"),
        ("topology + owners s (measured)", lambda r: f"{r.topology_s:.3f}"),
        ("plan_recovery s (measured, one node failed)", lambda r: f"{r.plan_s:.3f}"),
        ("replaying ranks / transfers", lambda r: f"{r.replaying} / {r.plan_transfers}"),
        ("buddy copies on another node", lambda r: f"{100 * r.buddies_other_node:.0f}%"),
        ("buddy copies on another rack", lambda r: f"{100 * r.buddies_other_rack:.0f}%"),
        ("ranks losing every copy in a rack failure",
         lambda r: f"{100 * r.ranks_lost_on_rack_failure:.0f}%"),
        ("buddy copies on another rack, with --moetion-rack-id",
         lambda r: f"{100 * r.buddies_other_rack_after:.0f}%"),
        ("ranks losing every copy in a rack failure, with --moetion-rack-id",
         lambda r: f"{100 * r.ranks_lost_on_rack_failure_after:.0f}%"),
        ("host memory per node, MoEtion GB", lambda r: f"{r.node_moetion_gb:.0f}"),
        ("host memory per node, dense copies GB", lambda r: f"{r.node_dense_gb:.0f}"),
    ]
    head = "| | " + " | ".join(f"{r.world} ranks" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    for name, get in fields:
        lines.append(f"| {name} | " + " | ".join(get(r) for r in rows) + " |")
    return "\n".join(lines)


def plot_scale(rows: Sequence[ScaleRow], path: str | Path) -> Path:
    """Four panels against world size: agreement, store load, planning, host memory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    x = [r.world for r in rows]

    ax = axes[0][0]
    ax.plot(x, [1e3 * r.agree_s_before for r in rows], "o-", color="tab:red",
            label="before: ring all_reduce, world+3 int64")
    ax.plot(x, [1e3 * r.agree_s_after for r in rows], "o-", color="tab:green",
            label="after: recursive doubling, 4 int64")
    ax.plot(x, [1e3 * r.agree_s_after_failure for r in rows], "o--", color="tab:green",
            label="after, iteration with a failure")
    ax.plot(x, [1e3 * AGREEMENT_BUDGET * r.iteration_s for r in rows], ":", color="gray",
            label=f"{100 * AGREEMENT_BUDGET:.0f}% of the iteration")
    ax.set_yscale("log")
    ax.set_ylabel("agreement per iteration (ms)")
    ax.set_title("agreement latency (alpha-beta model)")
    ax.legend(fontsize=7)

    ax = axes[0][1]
    ax.plot(x, [r.store_ops_s_before for r in rows], "o--", color="tab:blue",
            label="heartbeat ops/s, before")
    ax.plot(x, [r.store_ops_s for r in rows], "o-", color="tab:green",
            label="after (3 ops, scaled interval)")
    ax.axhline(STORE_CAPACITY_OPS_S, color="tab:red", ls="--",
               label=f"store capacity (measured, {STORE_CAPACITY_OPS_S:,.0f} ops/s)")
    ax.axhline(STORE_SAFE_UTILISATION * STORE_CAPACITY_OPS_S, color="gray", ls=":",
               label=f"{100 * STORE_SAFE_UTILISATION:.0f}% of capacity")
    ax.set_ylabel("ops/s on the rendezvous store")
    ax.set_title("heartbeat load on one TCPStore")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    ax.plot(x, [r.plan_s for r in rows], "o-", color="tab:purple", label="plan_recovery")
    ax.plot(x, [r.topology_s for r in rows], "o-", color="tab:orange", label="Topology + owners")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (measured, median)")
    ax.set_title("planner run time, one node failed")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    ax.plot(x, [r.node_moetion_gb for r in rows], "o-", color="tab:green", label="MoEtion")
    ax.plot(x, [r.node_dense_gb for r in rows], "o-", color="tab:blue",
            label="dense copies (1 + r)")
    ax.set_ylabel("host memory per node (GB)")
    ax.set_title("host memory per node")
    ax.legend(fontsize=7)

    for row in axes:
        for a in row:
            a.set_xscale("log", base=2)
            a.set_xlabel("ranks")
            a.grid(True, alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; write the plot and the table (``--out-dir``, default docs/)."""
    ap = argparse.ArgumentParser(prog="python -m megatron_moetion.bench.scale")
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measure-store", action="store_true",
                    help="measure a local TCPStore's ops/s and use it as the capacity")
    a = ap.parse_args(argv)
    capacity = STORE_CAPACITY_OPS_S
    if a.measure_store:
        capacity = measure_store_ops_s()
        print(f"measured store capacity: {capacity:,.0f} ops/s")
    rows = simulate(repeats=a.repeats, store_capacity_ops_s=capacity)
    table = format_table(rows)
    print(table)
    print("\nCrosses its budget (smallest world first):")
    for line in breaks_first(rows):
        print(f"- {line}")
    out = Path(a.out_dir)
    plot = plot_scale(rows, out / "img" / "scale.png")
    (out / "scale.md").write_text(report(rows, capacity))
    print(f"\nwrote {plot} and {out / 'scale.md'}")
    return 0


# Measured with the code before this change (same layouts, median of 3, this 2-CPU machine).
BEFORE_MEASURED = {"topology_s": (0.01, 0.13, 1.71), "plan_s": (0.002, 0.025, 0.235)}


def report(rows: Sequence[ScaleRow], capacity: float = STORE_CAPACITY_OPS_S) -> str:
    """docs/scale.md: the table, what breaks first, the fixes, the assumptions."""
    broken = "\n".join(f"- {line}" for line in breaks_first(rows)) or "- nothing"
    before = " | ".join(f"{t:.3f} s / {p:.3f} s" for t, p in zip(
        BEFORE_MEASURED["topology_s"], BEFORE_MEASURED["plan_s"], strict=False))
    ring = ", ".join(f"{r.agree_s_before:.2f} s per iteration at {r.world} ranks "
                     f"({100 * r.agree_share_before:.1f}%)" for r in rows)
    last = rows[-1]
    return f"""# Coordination at scale (simulated, no processes)

Generated by `python -m megatron_moetion.bench.scale` (`megatron_moetion/bench/scale.py`).
DeepSeek-V3's layout (TP1 PP16 EP64, 8 GPUs per node; `bench/presets.py`) scaled by DP to
1024, 4096 and 16384 ranks, Megatron rank order `tp-cp-ep-dp-pp` (a node's 8 ranks are 8 DP
ranks of one stage), racks of {NODES_PER_RACK} nodes. The planner rows run the real `Topology`
and `plan_recovery` on full-size synthetic holdings (two windows of W = 3 per rank, every
owner's copies, logs covering the replay) with one node's 8 ranks failed.

![coordination at scale](img/scale.png)

{format_table(rows)}

## What crosses its budget, before the fixes

{broken}

**What broke first: the agreement.** Its `dist.all_reduce(MAX)` of `world + 3` int64 ran
every iteration on the gloo control group, and gloo runs an all-reduce as a ring
(`gloo/allreduce.cc`: an unspecified algorithm is the ring): `2 (p - 1)` message steps. The
payload ({rows[-1].agree_bytes_before / 1e3:.0f} KB at {rows[-1].world} ranks) is not the
problem, the step count is: {ring}.

**The fix (`agreement.py`).** A constant 4-entry vector `[lost, -finished, -acked, W]` every
iteration; the per-rank flags only in the iteration where the first entry is non-zero (the
same on every rank, so every rank runs the second phase or none). Both are recursive doubling
over point-to-point messages (`allreduce_max`): `log2 p` steps, two more when p is not a power
of two. MAX over integers is exact and order-free, so every rank still gets the same
`Agreement`; `agree(...)`'s signature and result are unchanged. Modelled:
{1e3 * last.agree_s_after:.2f} ms at {last.world} ranks ({1e3 * last.agree_s_after_failure:.2f}
ms in an iteration with a failure), {last.agree_s_before / last.agree_s_after:,.0f}x less.

**Also fixed (quadratic set-up and planning).** `assign_buddies` scanned the world per node
and `Topology.owners` the world per call; `plan_recovery` tested membership in tuples and lists.
Before (measured, topology + owners / plan, 1k, 4k, 16k ranks): {before}. After: the table
(one pass, sets; same outputs, the existing unit tests unchanged).

**Second: the heartbeat store.** Every rank did {BEFORE_OPS_PER_TICK} round trips per heartbeat
(one write, four reads; the docstring said three) on the one rendezvous TCPStore, so 16k ranks
offered {rows[-1].store_ops_s_before:,.0f} ops/s, {100 * rows[-1].store_utilisation_before:.0f}%
of what a libuv TCPStore served here. Clients wait for replies, so the store does not fall over:
every tick, and every other user of the rendezvous store (the launcher), slows to the store's
pace. Fixed in two steps (`liveness.py`): a tick now does {rows[0].store_ops_per_tick:g} round
trips (the watched peer's `done` mark is read only when its heartbeat did not change, and its
key's existence only until its first heartbeat), and `scaled_interval` lengthens the interval
where the world would offer the store more than {STORE_BUDGET_OPS_S:,.0f} ops/s
({rows[-1].heartbeat_interval_s:.2f} s at {rows[-1].world} ranks): {100 * rows[-1].store_utilisation:.0f}%
of capacity, detection {rows[-1].detection_s:.1f} s instead of {rows[-1].detection_s_before:.1f} s.
Heartbeats by node (one rank per node beating for its local ranks through a node-local store)
would cut the load 8x without the later detection; not built. The declare scan (about two
store round trips per rank, serial) adds {rows[-1].declare_scan_s:.1f} s to the detection at
16k ranks; a node-level heartbeat would cuts it 8x too. (3) Not a scale effect but found here: buddies are the same local rank on the
next `r` nodes, so with {NODES_PER_RACK}-node racks half of the ranks have every copy inside
their own rack; a rack failure falls back to the persistent checkpoint. Fixed:
`--moetion-rack-id` orders the nodes round-robin over the racks (`topology.rack_order`), so
a node's next nodes, its buddies' nodes, are in other racks (the last two rows).

Host memory per node stays within a DGX H100's 2 TB (datasheet) at every size; it falls with
DP because the distributed optimizer shards the state over (expert) DP, while the logs
(boundary activations, not sharded) stay.

## Assumptions and sources

- Iteration time: `calculator.estimate_fwd_bwd_s` (4096-token sequences, 2 * PP micro-batches
  of 1 per DP replica, 30% MFU of 989 TFLOPs; assumed); constant in DP (weak scaling).
- alpha = {1e6 * ALPHA_S:g} us per gloo message step, bandwidth {BANDWIDTH_BPS / 1e9:g} GB/s
  per connection: assumed (kernel TCP on a 25-100 GbE front-end network). Ring:
  `2 (p-1) alpha + 2 (p-1)/p n / B`; recursive doubling: `steps (alpha + n / B)`.
- Store capacity {capacity:,.0f} ops/s: measured on this machine (torch 2.13 libuv TCPStore,
  16 client threads in 2 processes sharing 2 CPUs with the server: 54k ops/s; 1 x 4 threads:
  48k), rounded down; `--measure-store` re-measures. Budget: {100 * STORE_SAFE_UTILISATION:.0f}%
  of it (assumed: queueing delay doubles at 50% load).
- Heartbeat interval 1 s (before; after: `liveness.scaled_interval`) and detect timeout from
  `MoEtionConfig` defaults; detection = timeout + one interval to notice + the declare scan
  ({1e6 * STORE_OP_S:g} us per store round trip, assumed; 38 us measured on loopback) + one
  interval for every rank to read the verdict.
- {NODES_PER_RACK} nodes per rack: assumed (a ~40 kW rack holds four 10.2 kW DGX H100).
- Budgets: agreement <= {100 * AGREEMENT_BUDGET:.0f}% of an iteration, planning <=
  {PLANNER_BUDGET_S:g} s: assumed.
"""


if __name__ == "__main__":
    raise SystemExit(main())
