"""Snapshot sizes, sparse window and host memory for real MoE configurations (pure arithmetic).

For a model (``ModelConfig``) on a parallel layout (``ParallelLayout``) this builds the
operators one GPU of each pipeline stage holds, with their real per-GPU byte counts, and reuses
Algorithm 1 (``schedule.find_window`` / ``partition_for_window``) to size the sparse window.
Per-GPU figures are for the most loaded stage; per-node host memory assumes every GPU of the
node is that loaded (an upper bound). No torch, no process groups: numbers only.
Run ``python -m megatron_moetion.calculator`` for the preset table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_moetion.errors import ConfigError
from megatron_moetion.operators import OperatorSpec, OpKind, order_operators
from megatron_moetion.schedule import budget_bytes, find_window, partition_for_window

ACTIVE_BYTES_PER_PARAM = 12  # fp32 main weight + Adam m and v (PAPER.md 2.2)
FROZEN_BYTES_PER_PARAM = 2  # bf16 compute weight (PAPER.md 2.2)
LOG_BYTES_PER_ELEMENT = 2  # bf16 boundary activations and gradients
LOCAL_WINDOWS = 3  # capturing, shipped (in flight), persisted
REPLICA_WINDOWS = 2  # per owner: persisted + in flight (PAPER.md 2.3)


def _check(cls: str, name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer, as far as parameter counts go.

    Attributes:
        name: label used in tables.
        num_layers: transformer layers.
        hidden_size: model width h.
        num_experts: routed experts per MoE layer.
        expert_ffn_hidden: intermediate size of one routed expert.
        topk: routed experts per token.
        vocab_size: vocabulary size (untied input embedding and output layer).
        shared_expert_ffn: total intermediate size of the shared expert(s); 0 if none.
        attention_params: attention parameters per layer; None means 4*h*h (MHA, no bias).
        dense_layers: the first ``dense_layers`` layers have a dense MLP instead of experts.
        dense_ffn_hidden: intermediate size of that dense MLP.
        swiglu: gated MLPs (3 matrices) if True, else 2 matrices.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_experts: int
    expert_ffn_hidden: int
    topk: int
    vocab_size: int
    shared_expert_ffn: int = 0
    attention_params: int | None = None
    dense_layers: int = 0
    dense_ffn_hidden: int = 0
    swiglu: bool = True

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_experts", "expert_ffn_hidden", "topk",
                     "vocab_size"):
            v = getattr(self, name)
            _check("ModelConfig", name, v, isinstance(v, int) and v >= 1, "an integer >= 1")
        for name in ("shared_expert_ffn", "dense_layers", "dense_ffn_hidden"):
            v = getattr(self, name)
            _check("ModelConfig", name, v, isinstance(v, int) and v >= 0, "an integer >= 0")
        _check("ModelConfig", "topk", self.topk, self.topk <= self.num_experts,
               f"<= num_experts ({self.num_experts})")
        _check("ModelConfig", "dense_layers", self.dense_layers,
               self.dense_layers < self.num_layers, f"< num_layers ({self.num_layers})")
        _check("ModelConfig", "dense_ffn_hidden", self.dense_ffn_hidden,
               self.dense_layers == 0 or self.dense_ffn_hidden >= 1,
               ">= 1 when dense_layers > 0")
        if self.attention_params is not None:
            _check("ModelConfig", "attention_params", self.attention_params,
                   self.attention_params >= 1, ">= 1 or None")

    @property
    def _mats(self) -> int:
        return 3 if self.swiglu else 2

    @property
    def attention_params_per_layer(self) -> int:
        return self.attention_params or 4 * self.hidden_size * self.hidden_size

    @property
    def expert_params(self) -> int:
        return self._mats * self.hidden_size * self.expert_ffn_hidden

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def mlp_params_dense(self) -> int:
        return self._mats * self.hidden_size * self.dense_ffn_hidden

    @property
    def shared_params(self) -> int:
        return self._mats * self.hidden_size * self.shared_expert_ffn

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def is_moe(self, layer: int) -> bool:
        """Whether 1-based ``layer`` is an MoE layer."""
        return layer > self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.dense_layers

    @property
    def total_params(self) -> int:
        per_layer = self.attention_params_per_layer + 2 * self.hidden_size  # + 2 norms
        moe = self.num_experts * self.expert_params + self.shared_params + self.router_params
        return (self.num_layers * per_layer + self.dense_layers * self.mlp_params_dense
                + self.num_moe_layers * moe + 2 * self.embedding_params + self.hidden_size)

    @property
    def active_params(self) -> int:
        """Parameters one token's matmuls touch (output layer counted, embedding lookup not)."""
        per_moe = self.topk * self.expert_params + self.shared_params + self.router_params
        return (self.num_layers * self.attention_params_per_layer
                + self.dense_layers * self.mlp_params_dense + self.num_moe_layers * per_moe
                + self.embedding_params)


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron-style layout: world = tp * pp * dp; experts use EP inside DP, ETP = TP.

    Attributes:
        tp: tensor-parallel size (also the expert tensor-parallel size, Megatron's default).
        pp: pipeline stages.
        ep: expert-parallel size; must divide ``dp`` (expert data-parallel size = dp / ep).
        dp: data-parallel size.
        gpus_per_node: GPUs per node (host memory is per node).
        distributed_optimizer: fp32 main weights and Adam state sharded over (expert) DP.
    """

    tp: int
    pp: int
    ep: int
    dp: int
    gpus_per_node: int
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "dp", "gpus_per_node"):
            v = getattr(self, name)
            _check("ParallelLayout", name, v, isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("ParallelLayout", "ep", self.ep, self.dp % self.ep == 0,
               f"a divisor of dp ({self.dp})")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    def describe(self) -> str:
        opt = " distopt" if self.distributed_optimizer else ""
        return (f"TP{self.tp} PP{self.pp} EP{self.ep} DP{self.dp}{opt} "
                f"({self.world} GPUs, {self.gpus_per_node}/node)")


@dataclass(frozen=True)
class Preset:
    """A model on a layout with a workload; ``fwd_bwd_s`` is derived from FLOPs (see
    ``estimate_fwd_bwd_s``): seq_len * micro_batch * micro-batches * dp tokens per iteration."""

    model: ModelConfig
    layout: ParallelLayout
    seq_len: int = 4096  # assumed
    micro_batch_size: int = 1  # assumed
    num_micro_batches: int = 0  # 0: 2 * pp (assumed, a common bubble trade-off)
    gpu_peak_tflops: float = 312.0  # A100 bf16 dense
    mfu: float = 0.30  # assumed model FLOPs utilisation for MoE with pipeline bubbles

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size"):
            v = getattr(self, name)
            _check("Preset", name, v, v >= 1, ">= 1")
        _check("Preset", "num_micro_batches", self.num_micro_batches,
               self.num_micro_batches >= 0, ">= 0")
        _check("Preset", "mfu", self.mfu, 0 < self.mfu <= 1, "in (0, 1]")
        _check("Preset", "model", self.model.name,
               self.model.num_experts % self.layout.ep == 0,
               f"a model whose num_experts is divisible by ep ({self.layout.ep})")
        _check("Preset", "layout", self.layout.pp, self.layout.pp <= self.model.num_layers,
               f"a layout with pp <= num_layers ({self.model.num_layers})")

    @property
    def micro_batches(self) -> int:
        return self.num_micro_batches or 2 * self.layout.pp


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
        ops.append(op("output", OpKind.OUTPUT, None, None, model.embedding_params / tp + h,
                      shard))
    return order_operators(ops)


@dataclass(frozen=True)
class CalcResult:
    """Per-GPU (most loaded stage) and per-node figures for one preset. Bytes unless noted."""

    name: str
    layout: str
    total_params: int
    params_per_gpu: int
    dense_bytes_per_gpu: int
    fwd_bwd_s: float
    bandwidth_gbps: float
    window: int
    fits: bool
    slot_mean_bytes: float
    slot_max_bytes: int
    window_bytes: int
    node_snapshot_bytes: int
    node_replica_bytes: int
    node_log_bytes: int
    node_dense_bytes: int

    @property
    def dense_copy_s(self) -> float:
        return self.dense_bytes_per_gpu / (self.bandwidth_gbps * 1e9)

    @property
    def node_moetion_bytes(self) -> int:
        return self.node_snapshot_bytes + self.node_replica_bytes + self.node_log_bytes


def compute(p: Preset, *, bandwidth_gbps: float = 25.0, fwd_bwd_s: float | None = None,
            window: int | None = None, replication: int = 2) -> CalcResult:
    """Window, slot bytes and host memory of ``p``.

    Args:
        p: the preset.
        bandwidth_gbps: device-to-host copy bandwidth per GPU in GB/s (1e9 bytes/s).
        fwd_bwd_s: forward+backward time per iteration; None uses ``estimate_fwd_bwd_s``.
        window: force W (every stage partitioned into W slots); None sizes it with
            ``find_window`` per stage and takes the world-wide maximum.
        replication: buddies r holding copies of each window (paper default 2).

    Raises:
        ConfigError: a non-positive bandwidth, time or window, or a negative replication.
    """
    _check("compute", "bandwidth_gbps", bandwidth_gbps, bandwidth_gbps > 0, "> 0")
    _check("compute", "replication", replication, replication >= 0, ">= 0")
    if window is not None:
        _check("compute", "window", window, window >= 1, ">= 1 or None")
    fb = estimate_fwd_bwd_s(p) if fwd_bwd_s is None else fwd_bwd_s
    _check("compute", "fwd_bwd_s", fb, fb > 0, "> 0")
    budget = budget_bytes(bandwidth_gbps * 1e9, fb)
    stages = [stage_operators(p.model, p.layout, s) for s in range(p.layout.pp)]
    w = window or max(find_window(ops, budget).window for ops in stages)
    loaded = max(stages, key=lambda ops: sum(o.active_bytes for o in ops))
    sched = partition_for_window(loaded, w, budget)
    dense = sum(o.active_bytes for o in loaded)
    win_bytes = sum(sched.slot_bytes)
    lay = p.layout
    directions = 0 if lay.pp == 1 else 2  # middle stages send activations and gradients
    # Boundary tensors are split over TP: Megatron needs sequence parallelism for MoE with TP.
    act = p.seq_len * p.micro_batch_size * p.model.hidden_size * LOG_BYTES_PER_ELEMENT / lay.tp
    logs = directions * act * p.micro_batches * 2 * w
    g = lay.gpus_per_node
    return CalcResult(
        name=p.model.name, layout=lay.describe(), total_params=p.model.total_params,
        params_per_gpu=sum(o.num_params for o in loaded), dense_bytes_per_gpu=dense,
        fwd_bwd_s=fb, bandwidth_gbps=bandwidth_gbps, window=w, fits=sched.fits,
        slot_mean_bytes=win_bytes / w, slot_max_bytes=sched.max_slot_bytes,
        window_bytes=win_bytes,
        node_snapshot_bytes=g * LOCAL_WINDOWS * win_bytes,
        node_replica_bytes=g * replication * REPLICA_WINDOWS * win_bytes,
        node_log_bytes=int(g * logs),
        node_dense_bytes=g * (1 + replication) * dense)


# Presets. Layouts are assumptions (the paper's Table 2 layouts were not visible) unless noted.
PAPER_CLUSTER_GPUS_PER_NODE = 4  # Azure NC96ads_A100_v4 public spec: 4x A100 80GB (PAPER.md 6.1)

DEEPSEEK_MOE_16B = Preset(
    model=ModelConfig(
        name="DeepSeek-MoE-16.4B/64E",
        num_layers=28,  # HF deepseek-moe-16b-base config.json num_hidden_layers
        hidden_size=2048,  # config.json hidden_size
        num_experts=64,  # n_routed_experts
        expert_ffn_hidden=1408,  # moe_intermediate_size
        topk=6,  # num_experts_per_tok
        shared_expert_ffn=2 * 1408,  # n_shared_experts=2 of moe_intermediate_size each
        vocab_size=102400,  # vocab_size
        dense_layers=1,  # first_k_dense_replace
        dense_ffn_hidden=10944,  # intermediate_size
    ),
    # 12-stage pipeline (PAPER.md 6.5) on 12 nodes x 4 GPUs; EP4 DP4 assumed.
    layout=ParallelLayout(tp=1, pp=12, ep=4, dp=4, gpus_per_node=PAPER_CLUSTER_GPUS_PER_NODE),
)
QWEN_MOE_14B = Preset(
    model=ModelConfig(
        name="Qwen1.5-MoE-14.3B/64E (60 real)",
        num_layers=24,  # HF Qwen1.5-MoE-A2.7B config.json num_hidden_layers
        hidden_size=2048,  # hidden_size
        num_experts=64,  # real model has 60 (num_experts); the paper says 64E, we use 64
        expert_ffn_hidden=1408,  # moe_intermediate_size
        topk=4,  # num_experts_per_tok
        shared_expert_ffn=5632,  # shared_expert_intermediate_size
        vocab_size=151936,  # vocab_size
    ),
    # The paper's 48-GPU cluster with DeepSeek-MoE's layout (assumed).
    layout=ParallelLayout(tp=1, pp=12, ep=4, dp=4, gpus_per_node=PAPER_CLUSTER_GPUS_PER_NODE),
)
GPT_MOE_32E = Preset(
    model=ModelConfig(
        name="GPT-MoE/32E (assumed)",  # the paper's GPT-MoE size is not visible: all assumed
        num_layers=24,  # assumed (GPT-3 XL depth)
        hidden_size=2048,  # assumed (GPT-3 XL width)
        num_experts=32,  # paper Table 2: 32 experts
        expert_ffn_hidden=8192,  # assumed 4*h, GELU MLP
        topk=2,  # assumed (GShard/Switch-style top-2)
        vocab_size=50257,  # GPT-2 BPE vocabulary
        swiglu=False,
    ),
    layout=ParallelLayout(tp=1, pp=12, ep=4, dp=4, gpus_per_node=PAPER_CLUSTER_GPUS_PER_NODE),
)
MIXTRAL_8X7B = Preset(
    model=ModelConfig(
        name="Mixtral-8x7B",
        num_layers=32,  # HF Mixtral-8x7B-v0.1 config.json num_hidden_layers
        hidden_size=4096,  # hidden_size
        num_experts=8,  # num_local_experts
        expert_ffn_hidden=14336,  # intermediate_size
        topk=2,  # num_experts_per_tok
        vocab_size=32000,  # vocab_size
        # GQA: 32 query heads, 8 KV heads of 128: q,o 4096x4096, k,v 4096x1024
        attention_params=2 * 4096 * 4096 + 2 * 4096 * 1024,
    ),
    # 8 nodes x 8 H100 (989 TFLOPs bf16), PP4 EP8 as in public Megatron/NeMo recipes (assumed).
    layout=ParallelLayout(tp=1, pp=4, ep=8, dp=16, gpus_per_node=8),
    gpu_peak_tflops=989.0,
)
DEEPSEEK_V3 = Preset(
    model=ModelConfig(
        name="DeepSeek-V3-671B/256E",
        num_layers=61,  # DeepSeek-V3 config.json num_hidden_layers (MTP module not counted)
        hidden_size=7168,  # hidden_size
        num_experts=256,  # n_routed_experts
        expert_ffn_hidden=2048,  # moe_intermediate_size
        topk=8,  # num_experts_per_tok
        shared_expert_ffn=2048,  # n_shared_experts=1 of moe_intermediate_size
        vocab_size=129280,  # vocab_size
        dense_layers=3,  # first_k_dense_replace
        dense_ffn_hidden=18432,  # intermediate_size
        # MLA, approximated as its projections: q_a 7168x1536 + q_b 1536x(128*192) +
        # kv_a 7168x576 + kv_b 512x(128*256) + o (128*128)x7168 = ~187M (norms ignored)
        attention_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
        + 128 * 128 * 7168,
    ),
    # DeepSeek-V3 report 3.2: 2048 H800, PP16, EP64 over 8 nodes, ZeRO-1 DP (so DP128), TP1.
    layout=ParallelLayout(tp=1, pp=16, ep=64, dp=128, gpus_per_node=8),
    gpu_peak_tflops=989.0,
)
PRESETS: dict[str, Preset] = {p.model.name: p for p in (
    DEEPSEEK_MOE_16B, QWEN_MOE_14B, GPT_MOE_32E, MIXTRAL_8X7B, DEEPSEEK_V3)}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(rows: Sequence[CalcResult]) -> str:
    """Markdown table of ``compute`` results (GB = 1e9 bytes; host memory per node)."""
    head = ("| model | layout | params (B) | params/GPU (M) | fwd+bwd s | dense/GPU GB "
            "| dense copy s | W | slot mean GB | slot max GB | max/dense | window/dense "
            "| node snaps GB | node replicas GB | node logs GB | node MoEtion GB "
            "| node dense GB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        w = f"{r.window}" + ("" if r.fits else " (stalls)")
        lines.append(
            f"| {r.name} | {r.layout} | {r.total_params / 1e9:.1f} | "
            f"{r.params_per_gpu / 1e6:.0f} | {r.fwd_bwd_s:.2f} | {_gb(r.dense_bytes_per_gpu)} | "
            f"{r.dense_copy_s:.3f} | {w} | {_gb(r.slot_mean_bytes)} | {_gb(r.slot_max_bytes)} | "
            f"{r.slot_max_bytes / r.dense_bytes_per_gpu:.2f} | "
            f"{r.window_bytes / r.dense_bytes_per_gpu:.2f} | {_gb(r.node_snapshot_bytes)} | "
            f"{_gb(r.node_replica_bytes)} | {_gb(r.node_log_bytes)} | "
            f"{_gb(r.node_moetion_bytes)} | {_gb(r.node_dense_bytes)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the preset table at 25 GB/s (W sized by Algorithm 1), then the same at W = 3 (the
    paper's window) unless ``--window`` is given. fwd+bwd defaults to each preset's FLOPs
    estimate (``estimate_fwd_bwd_s``: 4096-token sequences, 2*pp micro-batches of 1 per DP
    replica, 30% MFU; all assumed)."""
    ap = argparse.ArgumentParser(prog="python -m megatron_moetion.calculator")
    ap.add_argument("--bandwidth-gbps", type=float, default=25.0)
    ap.add_argument("--fwd-bwd-s", type=float, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--replication", type=int, default=2)
    a = ap.parse_args(argv)
    windows = [a.window] if a.window else [None, 3]
    for w in windows:
        rows = [compute(p, bandwidth_gbps=a.bandwidth_gbps, fwd_bwd_s=a.fwd_bwd_s, window=w,
                        replication=a.replication) for p in PRESETS.values()]
        sized = f"W = {w}" if w else "W sized by Algorithm 1"
        print(f"\n{sized}, copy bandwidth {a.bandwidth_gbps:g} GB/s, r = {a.replication}\n")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
