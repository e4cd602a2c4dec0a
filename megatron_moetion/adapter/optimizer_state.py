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


def collect_rank_state(model_chunks, optimizer) -> dict[str, torch.Tensor]:
    """Named tensors of this rank's parameters, main copies and optimizer state (for dumps)."""
    named = named_model_params(model_chunks)
    name_of = {id(p): n for n, p in named.items()}
    tensors = {f"param/{n}": p.detach() for n, p in named.items()}
    for ms in main_states(optimizer):
        base = f"optim{ms.sub_index}/{name_of.get(id(ms.model_param), '?')}[{ms.start}:{ms.end}]"
        if not ms.shard_is_view:
            tensors[f"{base}/main"] = ms.main_param.detach()
        for key, value in sorted(ms.state().items()):
            if torch.is_tensor(value):
                tensors[f"{base}/{key}"] = value.detach()
            else:
                tensors[f"{base}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return tensors
