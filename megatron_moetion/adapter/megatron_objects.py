"""What a rank's MoEtion components point into: Megatron's model, optimizer and scheduler.

``MegatronObjects`` is built per generation of the job (``bind``) from the objects Megatron's
``pretrain()`` just built, and dropped as a whole when the generation fails (``release``): the
operators found in the model (``discovery``), the router buffers that are state, the optimizer
probe that records and injects the step's global values, and the rank's training state behind
its ``state_dict`` contract (``rank_state.RankState``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from megatron_moetion.adapter.capture import build_captures
from megatron_moetion.adapter.discovery import OperatorBinding, discover_operators
from megatron_moetion.adapter.optimizer_probe import OptimizerProbe
from megatron_moetion.adapter.rank_state import RankState
from megatron_moetion.operators import OpKind


@dataclass
class MegatronObjects:
    """One generation's Megatron objects and what MoEtion derived from them."""

    model: list
    optimizer: object
    scheduler: object
    args: object
    bindings: list[OperatorBinding]
    router_buffers: list
    probe: OptimizerProbe
    state: RankState

    @classmethod
    def bind(cls, model, optimizer, scheduler, args) -> MegatronObjects:
        bindings = discover_operators(model)
        router_buffers = [buf for b in bindings if b.kind is OpKind.ROUTER for buf in b.buffers]
        return cls(model, optimizer, scheduler, args, bindings, router_buffers,
                   OptimizerProbe(optimizer), RankState(model, optimizer, scheduler))

    def release(self) -> None:
        """Undo the optimizer probe; the caller drops this object (and with it every reference
        to the generation's model, optimizer and process groups)."""
        self.probe.uninstall()

    def fresh_captures(self):
        """Capture items for every operator, pointing into the live tensors."""
        return build_captures(self.bindings, self.optimizer)

    def zero_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    @contextlib.contextmanager
    def ddp_without_overlap(self):
        """Frozen parameters never report their gradients ready, so during replay the
        gradient reduction runs synchronously at the end (same buckets, same collectives)."""
        configs = [c.ddp_config for c in self.model if hasattr(c, "ddp_config")]
        saved = [c.overlap_grad_reduce for c in configs]
        for c in configs:
            c.overlap_grad_reduce = False
        try:
            yield
        finally:
            for c, value in zip(configs, saved):
                c.overlap_grad_reduce = value
