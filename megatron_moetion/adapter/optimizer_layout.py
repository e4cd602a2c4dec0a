"""Where each model parameter's main (FP32) copy and optimizer state live in Megatron.

Megatron has three optimizer layouts, all wrapped in a ``ChainedOptimizer`` (dense and expert
parameters get separate sub-optimizers):

* ``FP32Optimizer``: the inner torch optimizer steps the model parameters themselves;
* ``Float16OptimizerWithFloat16Params``: an FP32 copy per bf16/fp16 parameter
  (``param.main_param``); fp32 parameters are stepped in place;
* ``DistributedOptimizer``: each data-parallel rank owns a contiguous shard
  ``[start, end)`` of each parameter's flattened data; the main copy is that shard (a view of
  the model parameter for fp32, an FP32 clone for bf16/fp16).

``main_states()`` hides the three behind one record per (model parameter, sub-optimizer) that
this rank owns part of. The optimizer state tensors (Adam ``exp_avg``, ``exp_avg_sq``,
``step``) are read from the inner optimizer at use time: they only exist after the first step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MainState:
    """The part of one model parameter that one sub-optimizer of this rank updates.

    ``main_param`` holds elements ``[start, end)`` of ``model_param.view(-1)`` (flattened, in
    FP32 or the parameter's dtype for fp32 training); ``shard_is_view`` is true where the main
    copy is the model parameter's own memory (fp32 parameters).
    """

    sub_index: int
    model_param: torch.nn.Parameter
    main_param: torch.Tensor
    start: int
    end: int
    shard_is_view: bool
    optimizer: object  # the Megatron sub-optimizer (for its inner torch optimizer)

    @property
    def numel(self) -> int:
        return self.end - self.start

    def state(self) -> dict:
        """The inner optimizer's state for this main parameter (empty before the first step)."""
        return self.optimizer.optimizer.state.get(self.main_param, {})

    def flat_main(self) -> torch.Tensor:
        return self.main_param.view(-1)


def sub_optimizers(optimizer) -> list:
    """The Megatron sub-optimizers of a (possibly chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_states(optimizer) -> Iterator[MainState]:
    """Yield one ``MainState`` per (model parameter, sub-optimizer) this rank owns part of."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import (
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    for index, sub in enumerate(sub_optimizers(optimizer)):
        if getattr(sub, "is_stub_optimizer", False) or sub.optimizer is None:
            continue
        if isinstance(sub, DistributedOptimizer):
            for model_param, (group, order) in sub.model_param_group_index_map.items():
                main = sub.optimizer.param_groups[group]["params"][order]
                prange = sub._get_model_param_range_map(model_param)["param"]
                is_view = model_param.dtype == torch.float32
                yield MainState(index, model_param, main, prange.start, prange.end, is_view, sub)
        elif isinstance(sub, Float16OptimizerWithFloat16Params):
            for groups in (sub.float16_groups, sub.fp32_from_fp32_groups):
                for group in groups:
                    for model_param in group:
                        main = getattr(model_param, "main_param", None)
                        if model_param.dtype == torch.float32 or main is None:
                            main, is_view = model_param, True
                        else:
                            is_view = False
                        yield MainState(index, model_param, main, 0, model_param.numel(),
                                        is_view, sub)
        elif isinstance(sub, FP32Optimizer):
            for group in sub.optimizer.param_groups:
                for model_param in group["params"]:
                    yield MainState(index, model_param, model_param, 0, model_param.numel(),
                                    True, sub)
        else:
            from megatron_moetion.errors import UnsupportedConfigurationError

            raise UnsupportedConfigurationError(
                f"optimizer {type(sub).__name__} is not supported; MoEtion handles "
                f"DistributedOptimizer, Float16OptimizerWithFloat16Params and FP32Optimizer"
            )


def named_model_params(model_chunks) -> dict[str, torch.nn.Parameter]:
    """``chunk{i}.<name>`` for every parameter of every (unwrapped) model chunk."""
    from megatron.core.utils import unwrap_model

    named = {}
    for i, chunk in enumerate(unwrap_model(list(model_chunks))):
        for name, param in chunk.named_parameters():
            named[f"chunk{i}.{name}"] = param
    return named


def keeps_step_per_parameter(inner) -> bool:
    """torch's Adam and AdamW count ``step`` per parameter; Transformer Engine's and Apex's
    FusedAdam count it per parameter group (``param_groups[i]["step"]``)."""
    return isinstance(inner, torch.optim.Adam)


def ensure_optimizer_state(optimizer) -> None:
    """Create the inner optimizers' per-parameter state where it does not exist yet (Adam
    ``exp_avg``, ``exp_avg_sq``, and ``step`` where the optimizer keeps it per parameter; SGD's
    ``momentum_buffer``), so that a restore can write into it before the first step. A
    group-level ``step`` is restored with the parameter groups (``rank_state``)."""
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if getattr(sub, "is_stub_optimizer", False) or inner is None:
            continue
        if len(inner.state) == 0 and getattr(sub, "init_state_fn", None) is not None:
            sub.init_state_fn(inner, sub.config)
        per_param_step = keeps_step_per_parameter(inner)
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if isinstance(inner, torch.optim.SGD):
                    if group.get("momentum", 0):
                        state.setdefault("momentum_buffer", torch.zeros_like(param.data))
                    continue
                state.setdefault("exp_avg", torch.zeros_like(param.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(param.data))
                if per_param_step:
                    state.setdefault("step", torch.tensor(0.0))


# Megatron caches the results of some collectives on its optimizer objects, computed on first
# use (``has_grad_norm_group``: one all-reduce over the grad-stats group). They describe the
# model, not the rank's progress; a rebuilt optimizer must start with them, or its first step
# makes a collective its peers are not making.
_CACHES = ("_has_grad_norm_group_cache",)


def optimizer_caches(optimizer) -> list[dict]:
    """The cached collective results of the optimizer and each sub-optimizer, in order."""
    return [{name: dict(getattr(o, name)) for name in _CACHES if getattr(o, name, None)}
            for o in [optimizer, *sub_optimizers(optimizer)]]


def restore_optimizer_caches(optimizer, caches: list[dict]) -> None:
    for o, cached in zip([optimizer, *sub_optimizers(optimizer)], caches):
        for name, value in cached.items():
            setattr(o, name, dict(value))
