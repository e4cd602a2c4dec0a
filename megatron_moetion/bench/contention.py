"""A model of snapshot copies contending with the expert-parallel all-to-all on PCIe (pure).

A GPU's device-to-host snapshot copy and its off-node all-to-all traffic (GPUDirect RDMA to a
NIC behind the same PCIe switch) both leave the GPU through its one PCIe link. Where they
overlap, the link is shared and the all-to-all, which training waits for, slows down. This
model compares, for the most loaded GPU of each preset at its W (``calculator.compute``):

- *burst*: a slot copied in one go at the start of the forward (the copy queued after the
  optimizer step). It overlaps all-to-all in proportion to the share of the forward+backward
  time the link carries all-to-all traffic (assumed spread evenly);
- *interleaved* (``copy_schedule.ChunkedCopies``): the slot spread over the forward's attention
  blocks (layers x micro-batches quiet points). A chunk that drains within its attention block
  never meets an all-to-all; the rest of a chunk spills into the next dispatch (worst case).
  The last slot of every window is still copied in a burst, at the window's close (sealing
  needs its bytes), so one slot in W is a burst: at W = 1 interleaving changes nothing.

During an overlap each flow gets at least half the link (fair share); the all-to-all runs at
``min(network share, link)`` alone. Extra all-to-all time = overlap seconds x (rate alone /
rate shared - 1). Assumptions, all stated in the output: the GPU's link has the preset's
``pcie_gbps``; all-to-all tokens are bf16 (2 bytes per element), ``topk`` copies per token,
four transfers per MoE layer and micro-batch (dispatch and combine, forward and backward);
EP peers on the same node (``gpus_per_node / tp`` consecutive ranks) use NVLink; attention
takes its FLOPs share of a layer's forward, and the forward a third of forward+backward.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_moetion.bench.calculator import compute, stage_layers
from megatron_moetion.bench.presets import PRESETS, Preset

A2A_BYTES_PER_ELEMENT = 2  # bf16 tokens
A2A_TRANSFERS_PER_LAYER = 4  # dispatch + combine, forward + backward
FORWARD_SHARE = 1 / 3  # forward FLOPs of forward+backward (backward is twice the forward)


@dataclass(frozen=True)
class Contention:
    """One preset's figures (seconds per iteration unless noted)."""

    name: str
    window: int
    fwd_bwd_s: float
    a2a_bytes: float  # off-node all-to-all bytes per iteration of the most loaded GPU
    a2a_s: float  # time the GPU's link carries them, alone
    copy_s: float  # the largest slot's copy, alone
    quiet_points: int  # attention blocks per iteration (layers x micro-batches)
    attention_block_s: float
    chunk_s: float
    burst_extra_s: float  # per iteration, every slot a burst
    interleaved_extra_s: float  # per iteration, averaged over a window (its last slot a burst)
    chunked_extra_s: float  # per iteration if every slot, the last too, were interleaved

    def share(self, seconds: float) -> float:
        return seconds / self.fwd_bwd_s


def _moe_layers(p: Preset, stage: int) -> int:
    layers = stage_layers(p.model, p.layout.pp)[stage]
    n = sum(1 for layer in layers if p.model.is_moe(layer))
    return n + (p.model.mtp_layers if stage == p.layout.pp - 1 else 0)


def _extra(overlap_s: float, alone: float, link: float, copy: float) -> float:
    """Extra all-to-all seconds for ``overlap_s`` seconds of sharing the link with a copy."""
    shared = min(alone, max(link / 2, link - copy))
    return overlap_s * (alone / shared - 1)


def model(p: Preset) -> Contention:
    """The contention figures of ``p`` at the W ``calculator.compute`` sizes."""
    r = compute(p)
    lay, m = p.layout, p.model
    stage = max(range(lay.pp), key=lambda s: _moe_layers(p, s))
    moe_layers, layers = _moe_layers(p, stage), len(stage_layers(m, lay.pp)[stage])
    local_ep = min(lay.ep, max(1, lay.gpus_per_node // lay.tp))
    off_node = (lay.ep - local_ep) / lay.ep
    tokens = p.seq_len * p.micro_batch_size / lay.tp
    a2a_bytes = (tokens * m.topk * m.hidden_size * A2A_BYTES_PER_ELEMENT * off_node
                 * A2A_TRANSFERS_PER_LAYER * moe_layers * p.micro_batches)
    link, net, copy = p.pcie_gbps * 1e9, p.network_gbps_per_gpu * 1e9, r.copy_gbps * 1e9
    alone = min(net, link)
    a2a_s = a2a_bytes / alone
    fb = r.fwd_bwd_s
    copy_s = r.slot_max_bytes / copy
    # burst: the copy meets all-to-all for the share of the time the link carries it
    burst = _extra(copy_s * min(1.0, a2a_s / fb), alone, link, copy) if a2a_bytes else 0.0
    # interleaved: a chunk per attention block; what does not drain in it meets a dispatch
    points = max(1, (layers + (m.mtp_layers if stage == lay.pp - 1 else 0))
                 * p.micro_batches)
    per_moe = m.topk * m.expert_params + m.shared_params + m.router_params
    attn_share = m.attention_params_per_layer / (m.attention_params_per_layer + per_moe)
    attention_block_s = fb * FORWARD_SHARE * attn_share / points
    chunk_s = copy_s / points
    spill = min(copy_s, points * max(0.0, chunk_s - attention_block_s))
    chunked = _extra(spill, alone, link, copy) if a2a_bytes else 0.0
    interleaved = (burst + (r.window - 1) * chunked) / r.window  # the last slot: a burst
    return Contention(m.name, r.window, fb, a2a_bytes, a2a_s, copy_s, points,
                      attention_block_s, chunk_s, burst, interleaved, chunked)


def format_table(rows: Sequence[Contention]) -> str:
    """Markdown table (ms per iteration; shares of forward+backward)."""
    lines = ["| preset | W | off-node all-to-all GB/iter/GPU | all-to-all s (alone) | slot copy s "
             "| quiet points | attention block ms | chunk ms | extra all-to-all, burst "
             "| extra all-to-all, interleaved | every slot interleaved (not yet) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(
            f"| {c.name} | {c.window} | {c.a2a_bytes / 1e9:.2f} | {c.a2a_s:.3f} | "
            f"{c.copy_s:.3f} | {c.quiet_points} | {c.attention_block_s * 1e3:.2f} | "
            f"{c.chunk_s * 1e3:.2f} | {c.burst_extra_s * 1e3:.1f} ms "
            f"({c.share(c.burst_extra_s):.2%}) | {c.interleaved_extra_s * 1e3:.1f} ms "
            f"({c.share(c.interleaved_extra_s):.2%}) | {c.chunked_extra_s * 1e3:.1f} ms "
            f"({c.share(c.chunked_extra_s):.2%}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m megatron_moetion.bench.contention",
                            description=__doc__.splitlines()[0]).parse_args(argv)
    print(format_table([model(p) for p in PRESETS.values()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
