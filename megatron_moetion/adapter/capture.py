"""What to copy for each operator, ACTIVE or FROZEN, and where a snapshot restores to.

ACTIVE: for every part of an operator's parameters that this rank's optimizer owns, the main
(FP32) weights and every optimizer state tensor (Adam ``exp_avg``, ``exp_avg_sq``, ``step``).
FROZEN: the compute weights of that same part, bit-exact in their dtype (with the distributed
optimizer each data-parallel rank captures only its own shard, so frozen bytes are not
replicated across data-parallel ranks). Both modes also capture the operator's buffers (router
``expert_bias`` and token counters), marked ``written_outside_step`` (the next forward and
backward write them, so an asynchronous capture snapshots them before returning).

A FROZEN capture restores into the *main* parameter (bf16/fp16 -> fp32 is exact), so that
Megatron's own main-to-model copy and parameter all-gather rebuild exactly the captured compute
weights on every rank (``sync_model_params``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from megatron_moetion.adapter.discovery import OperatorBinding
from megatron_moetion.adapter.optimizer_layout import MainState, main_states, sub_optimizers
from megatron_moetion.operators import OperatorSpec
from megatron_moetion.snapshot import CaptureItem


@dataclass
class OpCapture:
    """One operator's capture items and, per item, the live tensor a restore writes into."""

    binding: OperatorBinding
    active: list[tuple[CaptureItem, torch.Tensor]] = field(default_factory=list)
    frozen: list[tuple[CaptureItem, torch.Tensor]] = field(default_factory=list)
    main_params: list[torch.Tensor] = field(default_factory=list)  # for grad nulling
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.binding.name

    def spec(self) -> OperatorSpec:
        b = self.binding
        return OperatorSpec(
            b.name, b.kind, b.layer, b.expert_id, b.num_params,
            active_bytes=sum(i.source.numel() * i.source.element_size() for i, _ in self.active),
            frozen_bytes=sum(i.source.numel() * i.source.element_size() for i, _ in self.frozen))


def _state_views(ms: MainState, a: int, b: int):
    """(field name, 1-D view) for the optimizer state of main elements [a, b)."""
    lo, hi = a - ms.start, b - ms.start
    for key, value in sorted(ms.state().items()):
        if not torch.is_tensor(value):
            continue
        if value.numel() == ms.numel and value.numel() > 1:
            yield key, value.view(-1)[lo:hi]
        elif value.numel() == 1:
            yield key, value.reshape(1)  # Adam's step: one per main parameter


def build_captures(bindings: list[OperatorBinding], optimizer) -> list[OpCapture]:
    """Capture items for every operator; the optimizer state must already exist (after the
    first optimizer step)."""
    by_param: dict[int, list[MainState]] = {}
    for ms in main_states(optimizer):
        by_param.setdefault(id(ms.model_param), []).append(ms)
    captures = []
    for binding in bindings:
        cap = OpCapture(binding)
        for piece in binding.pieces:
            cap.params.append(piece.param)
            for ms in by_param.get(id(piece.param), []):
                a, b = max(piece.start, ms.start), min(piece.end, ms.end)
                if a >= b:
                    continue
                base = f"{piece.name}[{a}:{b}]"
                main_view = ms.flat_main()[a - ms.start:b - ms.start]
                cap.active.append((CaptureItem(f"{base}/main", binding.name, "active", main_view),
                                   main_view))
                for key, view in _state_views(ms, a, b):
                    cap.active.append((CaptureItem(f"{base}/{key}", binding.name, "active", view),
                                       view))
                weight = piece.param.detach().view(-1)[a:b]
                cap.frozen.append((CaptureItem(f"{base}/weight", binding.name, "frozen", weight),
                                   main_view))
                cap.main_params.append(ms.main_param)
        for name, buf in binding.buffers:
            flat = buf.view(-1)
            for mode, items in (("active", cap.active), ("frozen", cap.frozen)):
                # the next forward (token counters) and backward (expert_bias) write these
                items.append((CaptureItem(f"buffer/{name}", binding.name, mode, flat,
                                          written_outside_step=True), flat))
        captures.append(cap)
    return captures


def linear_layers_by_weight(model_chunks) -> dict[int, torch.nn.Module]:
    """Megatron's tensor-parallel linear layers (``ColumnParallelLinear``,
    ``RowParallelLinear``: every expert, attention and dense-MLP projection of the local spec),
    keyed by ``id`` of their weight."""
    from megatron.core.utils import unwrap_model

    out = {}
    for chunk in unwrap_model(list(model_chunks)):
        for module in chunk.modules():
            weight = getattr(module, "weight", None)
            if hasattr(type(module), "_forward_impl") and isinstance(weight, torch.nn.Parameter):
                out[id(weight)] = module
    return out


@contextmanager
def frozen(captures: list[OpCapture], names: set[str], linears: dict[int, torch.nn.Module]):
    """Run the named operators FROZEN: their linear layers go through Megatron's own
    ``linear_with_frozen_weight`` (forward and input gradient, no weight-gradient GEMM).

    ``requires_grad`` stays on: with expert parallelism a layer whose local experts were all
    frozen would otherwise drop out of the backward all-to-all that the other ranks run. The
    few non-linear parameters (norms, router gate) still get a gradient, which the optimizer
    probe discards with the rest of the FROZEN operators' main gradients.
    """
    from megatron.core.tensor_parallel.layers import linear_with_frozen_weight

    patched = []
    for cap in captures:
        if cap.name not in names:
            continue
        for p in cap.params:
            module = linears.get(id(p))
            if module is not None and "_forward_impl" not in module.__dict__:
                module._forward_impl = linear_with_frozen_weight
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module._forward_impl


@torch.no_grad()
def sync_model_params(optimizer, model_chunks) -> None:
    """Rebuild every compute weight from the main parameters, as an optimizer step does:
    main -> model copy, then (distributed optimizer) the parameter all-gather."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    gather = False
    for sub in sub_optimizers(optimizer):
        if getattr(sub, "is_stub_optimizer", False):
            continue
        if isinstance(sub, DistributedOptimizer):
            sub._copy_main_params_to_model_params()
            gather = True
        elif isinstance(sub, Float16OptimizerWithFloat16Params):
            sub._copy_main_params_to_model_params()
    if gather:
        for chunk in model_chunks:
            chunk.start_param_sync(force_sync=True)
