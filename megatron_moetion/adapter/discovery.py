"""Find the operators of MCore model chunks: which parameters (or slices) each one holds.

* each routed expert of each MoE layer: a ``SequentialMLP`` local expert, or expert ``i`` of a
  ``TEGroupedMLP`` (its ``weight{i}``/``bias{i}``, or slice ``i`` of a single grouped weight);
* each router (``TopKRouter``), with all its buffers (``expert_bias``, token counters);
* the rest of each transformer layer (attention, norms, shared experts, dense MLP);
* the embedding; the output layer with the final norm; each MTP layer.

Parameters that fit none of these go to a per-chunk ``chunk{c}.other`` operator (with a
warning) so that every parameter belongs to exactly one operator.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from megatron_moetion.operators import OpKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of ``param.view(-1)`` that belong to one operator."""

    name: str  # chunk-qualified parameter name
    param: torch.nn.Parameter
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        whole = self.start == 0 and self.end == self.param.numel()
        return self.name if whole else f"{self.name}[{self.start}:{self.end}]"


@dataclass
class OperatorBinding:
    """An operator with the live tensors it covers on this rank."""

    name: str
    kind: OpKind
    layer: int | None
    expert_id: int | None
    pieces: list[Piece] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    modules: list[torch.nn.Module] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.pieces)


def _unwrap(chunks):
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(chunks))


def _moe_classes():
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return MoELayer, TopKRouter, TransformerLayer


def _expert_pieces(experts, prefix: str, global_ids: list[int]):
    """(global expert id, Piece) for every expert parameter of an experts module."""
    out = []
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is not None:  # SequentialMLP
        for j, expert in enumerate(local_experts):
            for pname, p in expert.named_parameters():
                out.append((global_ids[j], Piece(f"{prefix}local_experts.{j}.{pname}", p, 0,
                                                 p.numel())))
        return out
    for lin_name in ("linear_fc1", "linear_fc2"):  # TEGroupedMLP
        linear = getattr(experts, lin_name, None)
        num_gemms = getattr(linear, "num_gemms", None)
        if linear is None or num_gemms is None:
            continue
        for pname, p in linear.named_parameters(recurse=False):
            m = re.fullmatch(r"(weight|bias)(\d+)", pname)
            if m:
                out.append((global_ids[int(m.group(2))],
                            Piece(f"{prefix}{lin_name}.{pname}", p, 0, p.numel())))
            elif pname in ("weight", "bias") and p.shape[0] == num_gemms:
                per = p.numel() // num_gemms  # single grouped tensor, experts stacked on dim 0
                for i in range(num_gemms):
                    out.append((global_ids[i], Piece(f"{prefix}{lin_name}.{pname}", p, i * per,
                                                     (i + 1) * per)))
    return out


def discover_operators(model_chunks) -> list[OperatorBinding]:
    """Operators of this rank's model chunks, each parameter (slice) in exactly one."""
    MoELayer, TopKRouter, TransformerLayer = _moe_classes()
    ops: dict[str, OperatorBinding] = {}

    def op(name, kind, layer=None, expert_id=None) -> OperatorBinding:
        if name not in ops:
            ops[name] = OperatorBinding(name, kind, layer, expert_id)
        return ops[name]

    for c, chunk in enumerate(_unwrap(model_chunks)):
        claimed: set[int] = set()  # id() of parameters already assigned (whole or sliced)
        mtp_prefixes = {}
        for mname, _module in chunk.named_modules():
            m = re.fullmatch(r"mtp\.layers\.(\d+)", mname)
            if m:
                mtp_prefixes[mname + "."] = int(m.group(1))
        # MTP layers are one operator each (checked first: they may contain MoE layers too)
        for prefix, k in mtp_prefixes.items():
            mtp_op = op(f"mtp{k}", OpKind.MTP)
            for pname, p in chunk.named_parameters():
                if pname.startswith(prefix) and id(p) not in claimed:
                    mtp_op.pieces.append(Piece(f"chunk{c}.{pname}", p, 0, p.numel()))
                    claimed.add(id(p))
            mtp_op.modules.append(chunk.get_submodule(prefix[:-1]))
        for mname, module in chunk.named_modules():
            prefix = f"{mname}." if mname else ""
            if any(prefix.startswith(mp) for mp in mtp_prefixes):
                continue
            if isinstance(module, MoELayer):
                layer = module.layer_number
                ids = list(module.local_expert_indices)
                router = module.router
                r_op = op(f"layer{layer}.router", OpKind.ROUTER, layer)
                r_op.modules.append(router)
                for pname, p in router.named_parameters():
                    r_op.pieces.append(Piece(f"chunk{c}.{prefix}router.{pname}", p, 0, p.numel()))
                    claimed.add(id(p))
                for bname, b in router.named_buffers():
                    r_op.buffers.append((f"chunk{c}.{prefix}router.{bname}", b))
                for gid, piece in _expert_pieces(module.experts, f"chunk{c}.{prefix}experts.", ids):
                    e_op = op(f"layer{layer}.expert{gid}", OpKind.EXPERT, layer, gid)
                    e_op.pieces.append(piece)
                    claimed.add(id(piece.param))
        for mname, module in chunk.named_modules():
            prefix = f"{mname}." if mname else ""
            if any(prefix.startswith(mp) for mp in mtp_prefixes):
                continue
            if isinstance(module, TransformerLayer) and not isinstance(module, MoELayer):
                layer = module.layer_number
                ne = op(f"layer{layer}.non_expert", OpKind.NON_EXPERT, layer)
                ne.modules.append(module)
                for pname, p in module.named_parameters():
                    if id(p) not in claimed:
                        ne.pieces.append(Piece(f"chunk{c}.{prefix}{pname}", p, 0, p.numel()))
                        claimed.add(id(p))
        for pname, p in chunk.named_parameters():
            if id(p) in claimed:
                continue
            if pname.startswith("embedding."):
                target = op("embedding", OpKind.EMBEDDING)
            elif pname.startswith(("output_layer.", "decoder.final_layernorm.",
                                   "decoder.final_norm.")):
                target = op("output", OpKind.OUTPUT)
            else:
                logger.warning("[moetion] parameter %s fits no known operator; it is captured "
                               "with chunk%d.other", pname, c)
                target = op(f"chunk{c}.other", OpKind.NON_EXPERT)
            target.pieces.append(Piece(f"chunk{c}.{pname}", p, 0, p.numel()))
            claimed.add(id(p))
    # Persistent buffers of the other operators' modules travel with them (router buffers,
    # persistent or not, were claimed above; constant non-persistent ones such as RoPE
    # frequencies are not state).
    claimed_buffers = {id(b) for binding in ops.values() for _, b in binding.buffers}
    for binding in ops.values():
        if binding.kind is OpKind.ROUTER:
            continue
        for module in binding.modules:
            for sub_name, sub in module.named_modules():
                if isinstance(sub, TopKRouter):
                    continue
                for bname, b in sub._buffers.items():
                    if (b is None or id(b) in claimed_buffers
                            or bname in sub._non_persistent_buffers_set):
                        continue
                    binding.buffers.append((f"{binding.name}.{sub_name}.{bname}", b))
                    claimed_buffers.add(id(b))
    return [b for b in ops.values() if b.pieces or b.buffers]
