"""ETTR inputs derived from FLOPs, bytes and bandwidths, independently of the paper's results.

For a ``bench.presets.Preset`` this derives every parameter of the four schemes of
``bench.ettr`` (MoEtion, Gemini, CheckFreq, MoC-System), each as a ``Sourced`` value naming
where it comes from: a preset field (model card, datasheet), the calculator (``bench.calculator``:
FLOPs time, window, slot and dense bytes), a stated number of the paper's *setup* (PAPER.md 6.1:
links; 2.3: r = 2) or an explicit assumption. No input is solved from the paper's ETTRs,
recovery totals or overhead percentages: those appear only in the comparison
(``bench.performance``).

Cost model, per GPU of the most loaded pipeline stage (``calculator.compute``):

- t_iter = 6 * active params * tokens / (GPUs * peak * MFU); MFU counts the whole iteration,
  and the calculator uses the same time as the fwd+bwd deadline of the snapshot copy.
- A device-to-host copy overlaps the next iteration's fwd+bwd (PAPER.md 2.3; Gemini's async
  pinned copy waited on before the next optimizer step, ANCHORS.md 1.9): only the part of it
  longer than fwd+bwd stalls.
- A transfer off the node (replication to r peers, a persist to storage) overlaps training
  until the next checkpoint is due (Gemini "schedules checkpoint traffic to avoid interfering
  with training traffic", PAPER.md 6.1; CheckFreq pipelines snapshot and persist, PAPER.md 6.1);
  the node's NIC is assumed free of training traffic for it, as the calculator assumes for
  MoEtion's replication. What does not fit before the next checkpoint stalls.
- Every scheme pays the same detection and restart per failure (``DETECT_S``, ``RESTART_S``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_moetion.bench.calculator import ACTIVE_BYTES_PER_PARAM, CalcResult, compute
from megatron_moetion.bench.ettr import (
    CheckFreqScheme,
    GeminiScheme,
    MoCScheme,
    MoEtionScheme,
    Scheme,
    ettr_analytic,
    expected_recovery_dense,
)
from megatron_moetion.bench.presets import DEEPSEEK_V3, Preset

REPLICATION = 2  # PAPER.md 2.3: snapshots replicated to r = 2 peer nodes (Gemini: the same r)
# Detection: the project's heartbeat timeout, config.MoEtionConfig.detect_timeout_s default.
DETECT_S = 30.0
# Restart: a spare's process start, rendezvous and communicator rebuild (assumed; not measured
# here at scale).
RESTART_S = 60.0
PAPER_NODES = 12  # PAPER.md 6.1: 12 Azure nodes
# PAPER.md 6.1: Azure Blob at 40 Gbps, taken as the whole 12-node cluster's link (assumed:
# consistent with CheckFreq's reload, see docs/performance.md); other clusters scale it with
# their node count (assumed).
STORAGE_GBPS_PER_PAPER_CLUSTER = 40 / 8
MOC_FRACTION = 0.125  # PAPER.md 6.1/6.3: MoC starts at 12.5% of the experts per snapshot
MOC_DOUBLING_FAILURES = 8  # assumed: 12.5% -> 100% over the 24 failures of Fig 10 (PAPER.md 6.3)
MOC_INTERVAL = 1  # assumed: MoC snapshots its partial experts every iteration

# DeepSeek-V3 technical report, section 1: "each trillion tokens requires only 180K H800 GPU
# hours". Against the bf16 dense peak of the preset (H800 as H100 SXM, 989 TFLOPs) and the
# preset's 6 * active params per token this gives MFU = 0.358 (FP8 GEMMs included: it is the
# achieved model FLOPs over the bf16 peak, not over the FP8 peak).
DSV3_GPU_HOURS_PER_TRILLION_TOKENS = 180e3


@dataclass(frozen=True)
class Sourced:
    """A number with its unit and where it comes from (a document, a formula, or "assumed")."""

    value: float
    unit: str
    source: str

    def text(self) -> str:
        v = f"{self.value:.3g}" if abs(self.value) < 1e4 else f"{self.value:.0f}"
        return f"{v} {self.unit}".strip()


def preset_mfu(p: Preset) -> Sourced:
    """The MFU used for ``p``: DeepSeek-V3's from its report's GPU hours, else the preset's."""
    if p.model.name == DEEPSEEK_V3.model.name:
        flops = 6.0 * p.model.active_params * 1e12
        mfu = flops / (DSV3_GPU_HOURS_PER_TRILLION_TOKENS * 3600 * p.gpu_peak_tflops * 1e12)
        return Sourced(mfu, "", "DeepSeek-V3 report sec. 1: 180K H800 GPU hours per 1T tokens, "
                       "6 * active params per token over the bf16 peak")
    return Sourced(p.mfu, "", "assumed (Preset.mfu: MoE with pipeline bubbles; no public "
                   "figure for this model on this layout)")


def storage_gbps(p: Preset) -> float:
    """Remote storage bandwidth of ``p``'s cluster in GB/s (see the module constants)."""
    return STORAGE_GBPS_PER_PAPER_CLUSTER * nodes(p) / PAPER_NODES


def nodes(p: Preset) -> int:
    return math.ceil(p.layout.world / p.layout.gpus_per_node)


def expert_params(p: Preset) -> int:
    """Routed-expert parameters of the whole model (MTP modules included)."""
    m = p.model
    return (m.num_moe_layers + m.mtp_layers) * m.num_experts * m.expert_params


def dense_policy(t_iter_s: float, copy_excess_s: float, transfer_s: float, fixed_s: float,
                 mtbf_s: float) -> tuple[int, float]:
    """The interval k (iterations) maximising PAPER.md 1.4's ETTR for a dense scheme, and its
    stall per checkpoint: the copy part beyond fwd+bwd plus the part of the off-node transfer
    that does not fit in k iterations. This is the "optimal policy" of PAPER.md 1.2 with the
    stall a function of k (Young/Daly when the transfer fits).

    Raises:
        ValueError: a non-positive t_iter or MTBF, or a negative cost.
    """
    for name, v in (("t_iter_s", t_iter_s), ("mtbf_s", mtbf_s)):
        if not v > 0:
            raise ValueError(f"dense_policy: {name} must be > 0, got {v!r}")
    for name, v in (("copy_excess_s", copy_excess_s), ("transfer_s", transfer_s),
                    ("fixed_s", fixed_s)):
        if not v >= 0:
            raise ValueError(f"dense_policy: {name} must be >= 0, got {v!r}")

    def stall(k: int) -> float:
        return copy_excess_s + max(0.0, transfer_s - k * t_iter_s)

    top = math.ceil(max(transfer_s, math.sqrt(2 * (copy_excess_s + transfer_s) * mtbf_s))
                    / t_iter_s) + 2
    best = max(range(1, min(top, 10**6) + 1), key=lambda k: ettr_analytic(
        t_iter_s, stall(k), k, expected_recovery_dense(t_iter_s, k, fixed_s), mtbf_s))
    return best, stall(best)


@dataclass(frozen=True)
class EttrInputs:
    """Every ETTR input of one preset, each ``Sourced`` (see the module docstring).

    ``values`` keys: mfu, t_iter_s, moetion_stall_s (per iteration), moetion_fixed_s (per
    failure: detection, restart, buddy fetch, host-to-device), copy_excess_s (a dense snapshot's
    device-to-host copy beyond fwd+bwd), gemini_transfer_s (replication to r peers),
    gemini_load_s, checkfreq_transfer_s (persist to storage), checkfreq_load_s, moc_full_stall_s
    (per iteration, 100% of the experts; linear in the fraction), moc_load_s.
    """

    preset: str
    window: int
    binding: str
    fits: bool
    values: dict[str, Sourced]
    detect_restart_s: float = 0.0  # the part of every per-failure cost that is detect+restart

    def __getitem__(self, key: str) -> float:
        return self.values[key].value

    def schemes(self, mtbf_s: float) -> dict[str, Scheme]:
        """The four schemes at ``mtbf_s`` (the dense schemes' interval depends on it)."""
        t = self["t_iter_s"]
        gk, gstall = dense_policy(t, self["copy_excess_s"], self["gemini_transfer_s"],
                                  self["gemini_load_s"], mtbf_s)
        ck, cstall = dense_policy(t, self["copy_excess_s"], self["checkfreq_transfer_s"],
                                  self["checkfreq_load_s"], mtbf_s)
        return {
            "moetion": MoEtionScheme(t, self["moetion_stall_s"], self.window,
                                     fixed_recovery_s=self["moetion_fixed_s"]),
            "gemini": GeminiScheme(t, gstall, self["gemini_load_s"], interval_iters=gk),
            "checkfreq": CheckFreqScheme(t, cstall, self["checkfreq_load_s"], interval_iters=ck),
            "moc": MoCScheme(t, self["moc_full_stall_s"], MOC_FRACTION, self["moc_load_s"],
                             interval_iters=MOC_INTERVAL,
                             doubling_failures=MOC_DOUBLING_FAILURES),
        }


def derive_inputs(p: Preset, *, replication: int = REPLICATION, detect_s: float = DETECT_S,
                  restart_s: float = RESTART_S) -> EttrInputs:
    """Derive ``p``'s ETTR inputs (see ``EttrInputs``) from FLOPs, bytes and bandwidths."""
    mfu = preset_mfu(p)
    c: CalcResult = compute(replace(p, mfu=mfu.value), replication=replication)
    t, w = c.fwd_bwd_s, c.window
    copy_bps, net_bps = c.copy_gbps * 1e9, c.network_gbps * 1e9
    store_bps = storage_gbps(p) * 1e9
    fixed = detect_s + restart_s
    fixed_src = f"detection {detect_s:g} s (detect_timeout_s default) + restart {restart_s:g} s " \
                "(assumed)"
    dense = c.dense_bytes_per_gpu
    total_state = ACTIVE_BYTES_PER_PARAM * p.model.total_params
    experts = ACTIVE_BYTES_PER_PARAM * expert_params(p)
    moc_bytes = total_state - experts + MOC_FRACTION * experts
    moc_full = max(0.0, total_state / store_bps - t) + max(0.0, dense / copy_bps - t)
    net_src = f"{c.network_gbps:.3g} GB/s per GPU (the node's NIC / its GPUs)"
    copy_src = f"{c.copy_gbps:.3g} GB/s per GPU (PCIe share)"
    store_src = (f"{storage_gbps(p):.3g} GB/s (PAPER.md 6.1: 40 Gbps per 12 nodes"
                 + (")" if nodes(p) == PAPER_NODES else ", scaled to the node count: assumed)"))
    v = {
        "mfu": mfu,
        "t_iter_s": Sourced(t, "s", f"FLOPs: 6 * {p.model.active_params / 1e9:.1f}B active * "
                            f"{p.seq_len * p.micro_batch_size * p.micro_batches * p.layout.dp} "
                            f"tokens / ({p.layout.world} GPUs * {p.gpu_peak_tflops:g} TFLOPs * "
                            f"MFU) (calculator.estimate_fwd_bwd_s)"),
        "moetion_stall_s": Sourced(
            max(0.0, c.slot_max_bytes / copy_bps - t) + max(0.0, c.replication_s - w * t) / w,
            "s/iter", f"largest slot {c.slot_max_bytes / 1e9:.2f} GB over {copy_src} beyond "
            f"fwd+bwd, plus replication {c.replication_s:.2f} s to r={replication} beyond "
            f"W={w} iterations, per iteration (calculator)"),
        "moetion_fixed_s": Sourced(
            fixed + c.window_bytes / net_bps + c.window_bytes / copy_bps, "s/failure",
            f"{fixed_src} + persisted window {c.window_bytes / 1e9:.2f} GB from a buddy over "
            f"{net_src} + host-to-device over PCIe"),
        "copy_excess_s": Sourced(max(0.0, dense / copy_bps - t), "s/ckpt",
                                 f"dense {dense / 1e9:.2f} GB/GPU (12 B/param) over {copy_src} "
                                 "beyond fwd+bwd"),
        "gemini_transfer_s": Sourced(replication * dense / net_bps, "s/ckpt",
                                     f"dense {dense / 1e9:.2f} GB/GPU to r={replication} peers "
                                     f"over {net_src}; overlaps the interval"),
        "gemini_load_s": Sourced(fixed + dense / net_bps + dense / copy_bps, "s/failure",
                                 f"{fixed_src} + the failed node's dense state from a peer over "
                                 f"{net_src} + host-to-device"),
        "checkfreq_transfer_s": Sourced(total_state / store_bps, "s/ckpt",
                                        f"dense state {total_state / 1e9:.0f} GB over "
                                        f"{store_src}; overlaps the interval"),
        "checkfreq_load_s": Sourced(fixed + total_state / store_bps, "s/failure",
                                    f"{fixed_src} + the dense state back from storage"),
        "moc_full_stall_s": Sourced(moc_full, "s/iter",
                                    f"the whole state ({total_state / 1e9:.0f} GB) persisted "
                                    f"over {store_src} every iteration, beyond t_iter; "
                                    f"MoCScheme scales it linearly to the fraction (at "
                                    f"{MOC_FRACTION:.1%} the exact value, non-expert state in "
                                    f"full, is {max(0.0, moc_bytes / store_bps - t):.3g} s)"),
        "moc_load_s": Sourced(fixed + dense / net_bps + dense / copy_bps, "s/failure",
                              "as Gemini's (assumed: MoC's first level is in memory)"),
    }
    return EttrInputs(p.model.name, w, c.binding, c.fits, v, fixed)

