"""Operators: the unit of sparse checkpointing (pure data, no torch.distributed, no Megatron).

An operator is a group of parameters snapshotted together: one routed expert of one MoE layer,
one router, the non-expert parameters of one transformer layer (attention, norms, shared
experts, dense MLP), the embedding, the output layer (with the final norm), or one MTP layer.
Each carries the bytes its full state (``active_bytes``: main weights plus optimizer state) and
its compute weights (``frozen_bytes``) take on this rank, computed from the real dtypes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class OpKind(enum.Enum):
    EXPERT = "expert"
    ROUTER = "router"
    NON_EXPERT = "non_expert"
    EMBEDDING = "embedding"
    OUTPUT = "output"
    MTP = "mtp"


@dataclass(frozen=True, slots=True)
class OperatorSpec:
    """One operator as this rank sees it.

    Attributes:
        name: stable across ranks and iterations, e.g. ``layer3.expert5`` (global expert id).
        kind: what the operator is.
        layer: global 1-based layer number, or None (embedding, output).
        expert_id: global expert id for experts, else None.
        num_params: parameter elements of this operator held on this rank.
        active_bytes: bytes captured when ACTIVE (this rank's share of main weights + optimizer
            state, plus buffers).
        frozen_bytes: bytes captured when FROZEN (compute weights in their dtype, plus buffers).
    """

    name: str
    kind: OpKind
    layer: int | None
    expert_id: int | None
    num_params: int
    active_bytes: int
    frozen_bytes: int


# Order of the non-expert kinds at the tail of a window (paper Fig. 6: experts first, least
# popular first; then non-expert parts; routers last, since they see every token).
_TAIL_RANK = {OpKind.EMBEDDING: 0, OpKind.NON_EXPERT: 1, OpKind.MTP: 2, OpKind.OUTPUT: 3,
              OpKind.ROUTER: 4}


def order_operators(ops: Iterable[OperatorSpec],
                    popularity: Mapping[str, float] | None = None) -> list[OperatorSpec]:
    """Capture order: experts ascending by popularity (token count), then the other kinds.

    Ties keep a deterministic order (layer, expert id, name). Experts without a count sort as
    least popular, so a fresh run captures them first.
    """
    popularity = popularity or {}

    def key(op: OperatorSpec):
        if op.kind is OpKind.EXPERT:
            return (0, popularity.get(op.name, 0.0), op.layer or 0, op.expert_id or 0, op.name)
        return (1, _TAIL_RANK[op.kind], 0.0, op.layer or 0, 0, op.name)

    return sorted(ops, key=key)


def check_disjoint_cover(assignments: Mapping[str, Iterable[str]],
                         all_params: Iterable[str]) -> None:
    """Raise ValueError unless every parameter belongs to exactly one operator.

    Args:
        assignments: operator name -> names of the parameters (or parameter slices) it holds.
        all_params: every parameter name that must be covered.
    """
    owner: dict[str, str] = {}
    for op, params in assignments.items():
        for p in params:
            if p in owner:
                raise ValueError(f"parameter {p} belongs to operators {owner[p]} and {op}")
            owner[p] = op
    missing = sorted(set(all_params) - set(owner))
    if missing:
        raise ValueError(f"parameters in no operator: {missing[:5]}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    extra = sorted(set(owner) - set(all_params))
    if extra:
        raise ValueError(f"operators hold unknown parameters: {extra[:5]}")
