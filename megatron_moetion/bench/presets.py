"""The MoE models, parallel layouts and workloads the calculator sizes (plain, validated data).

``ModelConfig`` counts a decoder-only MoE transformer's parameters, ``ParallelLayout`` places it
on a Megatron-style layout and ``Preset`` adds the workload (sequence length, micro-batches,
GPU throughput). ``PRESETS`` holds the paper's three models and two larger public ones, each
number sourced in a comment or marked assumed. ``bench.calculator`` turns a preset into
snapshot bytes, a window and host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_moetion.errors import ConfigError


def check_field(cls: str, name: str, value: float, ok: bool, allowed: str) -> None:
    """Raise ``ConfigError`` naming ``cls.name`` and what it must be, unless ``ok``."""
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
        mtp_layers: multi-token-prediction modules (DeepSeek-V3: 1), each an MoE transformer
            layer plus a 2h x h projection and three norms, on the last pipeline stage
            (embedding and output head shared with the main model, as in Megatron).
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
    mtp_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_experts", "expert_ffn_hidden", "topk",
                     "vocab_size"):
            v = getattr(self, name)
            check_field("ModelConfig", name, v, isinstance(v, int) and v >= 1, "an integer >= 1")
        for name in ("shared_expert_ffn", "dense_layers", "dense_ffn_hidden", "mtp_layers"):
            v = getattr(self, name)
            check_field("ModelConfig", name, v, isinstance(v, int) and v >= 0, "an integer >= 0")
        check_field("ModelConfig", "topk", self.topk, self.topk <= self.num_experts,
               f"<= num_experts ({self.num_experts})")
        check_field("ModelConfig", "dense_layers", self.dense_layers,
               self.dense_layers < self.num_layers, f"< num_layers ({self.num_layers})")
        check_field("ModelConfig", "dense_ffn_hidden", self.dense_ffn_hidden,
               self.dense_layers == 0 or self.dense_ffn_hidden >= 1,
               ">= 1 when dense_layers > 0")
        if self.attention_params is not None:
            check_field("ModelConfig", "attention_params", self.attention_params,
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
    def moe_layer_params(self) -> int:
        """One MoE transformer layer: attention, two norms, every expert, shared, router."""
        return (self.attention_params_per_layer + 2 * self.hidden_size
                + self.num_experts * self.expert_params + self.shared_params
                + self.router_params)

    @property
    def mtp_params_per_module(self) -> int:
        """One MTP module: an MoE layer, the 2h x h projection and three norms."""
        h = self.hidden_size
        return self.moe_layer_params + 2 * h * h + 3 * h

    @property
    def total_params(self) -> int:
        """Main model and MTP modules (DeepSeek-V3: 671B + 14B, as its report counts them)."""
        per_layer = self.attention_params_per_layer + 2 * self.hidden_size  # + 2 norms
        moe = self.num_experts * self.expert_params + self.shared_params + self.router_params
        return (self.num_layers * per_layer + self.dense_layers * self.mlp_params_dense
                + self.num_moe_layers * moe + 2 * self.embedding_params + self.hidden_size
                + self.mtp_layers * self.mtp_params_per_module)

    @property
    def main_params(self) -> int:
        """Without the MTP modules (the size a model's name gives)."""
        return self.total_params - self.mtp_layers * self.mtp_params_per_module

    @property
    def active_params(self) -> int:
        """Parameters one token's matmuls touch (output layer counted, embedding lookup not)."""
        per_moe = self.topk * self.expert_params + self.shared_params + self.router_params
        h = self.hidden_size
        mtp = self.attention_params_per_layer + per_moe + 2 * h * h + self.embedding_params
        return (self.num_layers * self.attention_params_per_layer
                + self.dense_layers * self.mlp_params_dense + self.num_moe_layers * per_moe
                + self.embedding_params + self.mtp_layers * mtp)


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
            check_field("ParallelLayout", name, v, isinstance(v, int) and v >= 1, "an integer >= 1")
        check_field("ParallelLayout", "ep", self.ep, self.dp % self.ep == 0,
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
    """A model on a layout with a workload and its machines; ``fwd_bwd_s`` is derived from
    FLOPs (see ``calculator.estimate_fwd_bwd_s``): seq_len * micro_batch * micro-batches * dp
    tokens per iteration.

    The machine: ``gpu_peak_tflops`` (bf16 dense), ``pcie_gbps`` the host link of one PCIe
    switch in GB/s (1e9 bytes/s, achievable device-to-host into pinned memory) shared by
    ``gpus_per_pcie_switch`` GPUs, and ``nic_gbps`` the node's network bandwidth in GB/s
    shared by its ``layout.gpus_per_node`` GPUs (replication to buddies on other nodes).
    """

    model: ModelConfig
    layout: ParallelLayout
    seq_len: int = 4096  # assumed
    micro_batch_size: int = 1  # assumed
    num_micro_batches: int = 0  # 0: 2 * pp (assumed, a common bubble trade-off)
    gpu_peak_tflops: float = 312.0  # A100 bf16 dense
    mfu: float = 0.30  # assumed model FLOPs utilisation for MoE with pipeline bubbles
    pcie_gbps: float = 25.0  # PAPER.md 3 (Algorithm 1's default): PCIe Gen4 x16, achieved
    gpus_per_pcie_switch: int = 1
    nic_gbps: float = 10.0  # PAPER.md 6.1: 80 Gbps between nodes

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size"):
            v = getattr(self, name)
            check_field("Preset", name, v, v >= 1, ">= 1")
        check_field("Preset", "num_micro_batches", self.num_micro_batches,
               self.num_micro_batches >= 0, ">= 0")
        check_field("Preset", "mfu", self.mfu, 0 < self.mfu <= 1, "in (0, 1]")
        for name in ("gpu_peak_tflops", "pcie_gbps", "nic_gbps"):
            check_field("Preset", name, getattr(self, name), getattr(self, name) > 0, "> 0")
        check_field("Preset", "gpus_per_pcie_switch", self.gpus_per_pcie_switch,
                    1 <= self.gpus_per_pcie_switch <= self.layout.gpus_per_node,
                    f"in [1, gpus_per_node ({self.layout.gpus_per_node})]")
        check_field("Preset", "model", self.model.name,
               self.model.num_experts % self.layout.ep == 0,
               f"a model whose num_experts is divisible by ep ({self.layout.ep})")
        check_field("Preset", "layout", self.layout.pp, self.layout.pp <= self.model.num_layers,
               f"a layout with pp <= num_layers ({self.model.num_layers})")

    @property
    def micro_batches(self) -> int:
        return self.num_micro_batches or 2 * self.layout.pp

    @property
    def copy_gbps_per_gpu(self) -> float:
        """One GPU's device-to-host share when every GPU of its PCIe switch copies at once."""
        return self.pcie_gbps / self.gpus_per_pcie_switch

    @property
    def network_gbps_per_gpu(self) -> float:
        """One GPU's share of the node's network when every GPU replicates at once."""
        return self.nic_gbps / self.layout.gpus_per_node


# Presets. Layouts are assumptions (the paper's Table 2 layouts were not visible) unless noted.
PAPER_CLUSTER_GPUS_PER_NODE = 4  # Azure NC96ads_A100_v4 public spec: 4x A100 80GB (PAPER.md 6.1)
# The paper's cluster uses the Preset defaults: A100 312 TFLOPs, PCIe 25 GB/s per GPU (one GPU
# per switch, assumed), 10 GB/s per node (80 Gbps, PAPER.md 6.1).
H100_NODE = {
    "gpu_peak_tflops": 989.0,  # H100 SXM bf16 dense (NVIDIA datasheet)
    # PCIe Gen5 x16 host link per switch, 64 GB/s raw, ~50 GB/s achieved (assumed); DGX/HGX
    # H100 boards put two GPUs behind each PCIe switch (assumed from the HGX block diagram)
    "pcie_gbps": 50.0,
    "gpus_per_pcie_switch": 2,
    "nic_gbps": 8 * 50.0,  # 8x 400 Gbps ConnectX-7 compute NICs per node (DGX H100 datasheet)
}
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
    **H100_NODE,
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
        mtp_layers=1,  # num_nextn_predict_layers (report 2.2: MTP depth D = 1)
        # MLA, approximated as its projections: q_a 7168x1536 + q_b 1536x(128*192) +
        # kv_a 7168x576 + kv_b 512x(128*256) + o (128*128)x7168 = ~187M (norms ignored)
        attention_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
        + 128 * 128 * 7168,
    ),
    # DeepSeek-V3 report 3.2: 2048 H800, PP16, EP64 over 8 nodes, ZeRO-1 DP (so DP128), TP1.
    layout=ParallelLayout(tp=1, pp=16, ep=64, dp=128, gpus_per_node=8),
    # DeepSeek-V3 report 3.1: H800 nodes, 8 GPUs on NVLink, one 400 Gbps IB NIC (50 GB/s) each;
    # H800 peak as H100's (same SXM compute); PCIe as H100_NODE (assumed)
    **(H100_NODE | {"nic_gbps": 8 * 50.0}),
)
QWEN3_235B = Preset(
    model=ModelConfig(
        name="Qwen3-235B-A22B/128E",
        num_layers=94,  # HF Qwen3-235B-A22B config.json num_hidden_layers
        hidden_size=4096,  # hidden_size
        num_experts=128,  # num_experts (every layer MoE: mlp_only_layers = [])
        expert_ffn_hidden=1536,  # moe_intermediate_size
        topk=8,  # num_experts_per_tok
        vocab_size=151936,  # vocab_size (untied: tie_word_embeddings false)
        # GQA: 64 query heads, 4 KV heads, head_dim 128: q,o 4096x8192, k,v 4096x512
        attention_params=2 * 4096 * 8192 + 2 * 4096 * 512,
    ),
    # 512 H100 (64 nodes x 8), PP8 EP32 DP64 TP1: the layout is assumed (no public recipe fixed).
    layout=ParallelLayout(tp=1, pp=8, ep=32, dp=64, gpus_per_node=8),
    **H100_NODE,
)
PRESETS: dict[str, Preset] = {p.model.name: p for p in (
    DEEPSEEK_MOE_16B, QWEN_MOE_14B, GPT_MOE_32E, MIXTRAL_8X7B, DEEPSEEK_V3, QWEN3_235B)}
