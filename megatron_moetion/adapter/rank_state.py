"""Everything one rank holds, by name, for the determinism oracle (``megatron_moetion.oracle``).

``oracle_state`` returns two flat dicts. Named tensors (compared bit for bit):

* ``param/chunk{c}.<name>``: every parameter of every unwrapped model chunk;
* ``optim{i}/<param>[start:end]/main|exp_avg|...``: main weights and every per-parameter
  optimizer state tensor (``collect_rank_state``);
* ``buffer/chunk{c}.<name>``: every module buffer, non-persistent ones included
  (``named_buffers()`` does not filter on persistence): router ``expert_bias`` and
  ``local_tokens_per_expert``, RoPE frequencies, ...;
* ``rng/cpu``, ``rng/cuda`` (where CUDA is available), ``rng/tracker/<stream>`` (every stream
  of Megatron's ``CudaRNGStatesTracker``), ``rng/python``, ``rng/numpy``;
* tensor-valued parameter-group fields and grad-scaler fields (a fused Adam's ``step`` may be a
  tensor).

Exact scalars (the oracle stores floats as ``float.hex``):

* ``optim{i}/group{g}/<field>``: every field of every parameter group of every sub-optimizer's
  inner torch optimizer (``lr``, ``weight_decay``, ``betas``, ``eps``, ``step`` where the
  optimizer keeps it per group, Megatron's ``wd_mult``, ...), and ``.../num_params``;
* ``scheduler/<key>``: ``OptimizerParamScheduler.state_dict()``;
* ``grad_scaler/optim{i}/<key>`` (or ``grad_scaler/optim{i}`` = None without a scaler),
  ``loss_scale``;
* ``consumed_train_samples``, ``skipped_train_samples``.

``loss_metrics`` reads the per-iteration auxiliary losses Megatron accumulates outside
``loss_dict`` (MoE aux/seq-aux/global-aux/z losses, MTP losses).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from megatron_moetion.adapter.optimizer_state import collect_rank_state, sub_optimizers
from megatron_moetion.adapter.training_state import (
    capture_rng,
    grad_scaler_states,
    loss_scale,
    scheduler_state,
)


def _put(tensors: dict, scalars: dict, name: str, value: Any) -> None:
    if torch.is_tensor(value):
        tensors[name] = value.detach()
    else:
        scalars[name] = value


def _python_rng() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    gauss_bits = torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)
    return torch.cat([torch.tensor([version, *internal, gauss is not None], dtype=torch.int64),
                      gauss_bits.view(torch.int64)])


def _numpy_rng() -> torch.Tensor | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    head = torch.tensor([pos, has_gauss], dtype=torch.int64)
    return torch.cat([head, torch.from_numpy(keys.astype(np.int64)),
                      torch.tensor([cached], dtype=torch.float64).view(torch.int64)])


def oracle_state(model_chunks, optimizer, scheduler, args=None) -> tuple[dict, dict]:
    """``(tensors, scalars)``: everything this rank holds (see module docstring). ``args`` is
    Megatron's parsed arguments (``get_args()`` when None)."""
    tensors: dict[str, torch.Tensor] = dict(collect_rank_state(model_chunks, optimizer))
    scalars: dict[str, Any] = {}
    for i, sub in enumerate(sub_optimizers(optimizer)):
        inner = getattr(sub, "optimizer", None)
        if getattr(sub, "is_stub_optimizer", False) or inner is None:
            continue
        for g, group in enumerate(inner.param_groups):
            scalars[f"optim{i}/group{g}/num_params"] = len(group["params"])
            for key, value in group.items():
                if key != "params":
                    _put(tensors, scalars, f"optim{i}/group{g}/{key}", value)
    for key, value in scheduler_state(scheduler).items():
        _put(tensors, scalars, f"scheduler/{key}", value)
    for i, state in enumerate(grad_scaler_states(optimizer)):
        if state is None:
            scalars[f"grad_scaler/optim{i}"] = None
        for key, value in (state or {}).items():
            _put(tensors, scalars, f"grad_scaler/optim{i}/{key}", value)
    scalars["loss_scale"] = loss_scale(optimizer)
    rng = capture_rng()
    tensors["rng/cpu"] = rng["cpu"]
    if "cuda" in rng:
        tensors["rng/cuda"] = rng["cuda"]
    for name, state in rng["tracker"].items():
        tensors[f"rng/tracker/{name}"] = state
    tensors["rng/python"] = _python_rng()
    numpy_state = _numpy_rng()
    if numpy_state is not None:
        tensors["rng/numpy"] = numpy_state
    if args is None:
        from megatron.training import get_args

        args = get_args()
    scalars["consumed_train_samples"] = int(args.consumed_train_samples)
    scalars["skipped_train_samples"] = int(getattr(args, "skipped_train_samples", 0))
    return tensors, scalars


def loss_metrics() -> dict[str, dict[str, list[float]]]:
    """This rank's per-layer auxiliary losses of the current iteration, as accumulated so far:
    ``{"moe": {name: [per layer]}, "mtp": {name: [per layer]}}``.

    Megatron's ``loss_dict`` holds only ``lm loss``. The routers record their aux losses
    (``load_balancing_loss``, ``seq_load_balancing_loss``, ``global_load_balancing_loss``,
    ``z_loss``) in the MoE metrics tracker (``moe_logging.get_moe_metrics_tracker()``), and the
    MTP layers theirs in ``MTPLossLoggingHelper.tracker``, summed over the micro-batches of the
    iteration; ``training_log`` reduces them across ranks and clears them. ``on_train_step_end``
    runs before ``training_log``, so these are this rank's own unreduced sums of the iteration.
    Entries that hold only zeros are left out.
    """
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    out: dict[str, dict[str, list[float]]] = {"moe": {}, "mtp": {}}
    for name, entry in sorted(get_moe_metrics_tracker().metrics.items()):
        # an entry that only holds zeros is one ``training_log`` registered for logging (it
        # logs an absent name as zeros too): a process that joined later has not got it yet
        if torch.count_nonzero(entry.values) == 0:
            continue
        out["moe"][name] = [float(v) for v in entry.values.detach().double().cpu().tolist()]
    try:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    except ImportError:  # pragma: no cover - present in megatron-core 0.19
        return out
    for name in ("loss_values", "correct_values", "total_values"):
        values = MTPLossLoggingHelper.tracker.get(name)
        if torch.is_tensor(values):
            out["mtp"][name] = [float(v) for v in values.detach().double().cpu().tolist()]
    return out
