"""Everything one rank holds for training, behind one ``state_dict``/``load_state_dict`` contract.

``RankState`` wraps a rank's Megatron model chunks, optimizer and LR scheduler. What it covers:
parameters; module buffers (non-persistent ones included: router ``expert_bias`` and token
counters); main (FP32) weights and every per-parameter optimizer state tensor
(``optimizer_layout.main_states``); every field of every parameter group (``lr``,
``weight_decay``, ``betas``, ``eps``, and ``step`` where the optimizer keeps it per group, as
Transformer Engine's and Apex's FusedAdam do); the ``OptimizerParamScheduler``; the grad scalers
and loss scale; the cached collective results of the optimizer objects. RNG streams live in
``rng_state``. Its users:

* the in-place replacement (``state_dict`` / ``load_state_dict``): a survivor keeps its state
  as plain tensors across a generation and moves it into the rebuilt objects, bit for bit;
* captures and restores (``step_state`` / ``load_step_state``): the small per-iteration state
  each snapshot slot carries in its metadata and the replay restores;
* the replay's self-check (``fingerprint``), fault injection (``wipe``), and the determinism
  oracle's dump (``named_tensors``, ``oracle_state``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from megatron_moetion.adapter import rng_state
from megatron_moetion.adapter.optimizer_layout import (
    ensure_optimizer_state,
    main_states,
    named_model_params,
    optimizer_caches,
    restore_optimizer_caches,
    sub_optimizers,
)


def _copy_value(value):
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


def param_group_state(optimizer) -> list[dict]:
    """Every field of every parameter group except its parameters, in order, copied."""
    return [{k: _copy_value(v) for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups]


@torch.no_grad()
def restore_param_groups(optimizer, saved: list[dict]) -> None:
    """Write ``param_group_state``'s result back; a tensor field keeps its device."""
    groups = optimizer.param_groups
    if len(groups) != len(saved):
        raise RuntimeError(f"the optimizer has {len(groups)} parameter groups, the saved state "
                           f"{len(saved)}")
    for group, fields in zip(groups, saved):
        for key, value in fields.items():
            old = group.get(key)
            if torch.is_tensor(value) and torch.is_tensor(old):
                group[key] = value.detach().clone().to(old.device, old.dtype)
            else:
                group[key] = _copy_value(value)


def capture_buffers(buffers: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in buffers}


@torch.no_grad()
def restore_buffers(buffers: list[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor]):
    for name, b in buffers:
        b.copy_(saved[name])


def _tensor_sum(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    raw = flat.view(torch.int16) if flat.element_size() >= 2 else flat.view(torch.uint8)
    wide = raw.to(torch.int64)
    return wide.sum() * 1_000_003 + (wide * wide).sum()


_GARBAGE = torch.Generator().manual_seed(0xBAD)


def _garbage(t: torch.Tensor) -> None:
    """Overwrite with small finite noise: NaN would trip Megatron's own NaN checks, whose
    rerun machinery then re-runs only some ranks' forward-backward, a divergence no real
    failure causes (a dead rank sends nothing at all)."""
    if t.is_floating_point():
        noise = torch.randn(t.shape, generator=_GARBAGE, dtype=torch.float32) * 0.02
        t.copy_(noise.abs().to(t.device, t.dtype))
    else:
        t.fill_(0)


def _put(tensors: dict, scalars: dict, name: str, value: Any) -> None:
    if torch.is_tensor(value):
        tensors[name] = value.detach()
    else:
        scalars[name] = value


class RankState:
    """One rank's training state in Megatron's objects (see the module docstring).

    Args:
        model: Megatron's list of (DDP-wrapped) model chunks.
        optimizer: Megatron's (chained) optimizer.
        scheduler: Megatron's ``OptimizerParamScheduler`` (or None).
    """

    def __init__(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    # ------------------------------------------------------------------ the whole state
    def state_dict(self) -> dict:
        """The whole state as plain tensors and dicts, holding no Megatron object (and so no
        process group: a survivor must drop every reference to its failed generation's groups
        for their sockets to close)."""
        from megatron.core.utils import unwrap_model

        params = named_model_params(self.model)
        name_of = {id(p): n for n, p in params.items()}
        return {
            "params": {n: p.data for n, p in params.items()},
            "buffers": [dict(c.named_buffers()) for c in unwrap_model(list(self.model))],
            "main": [(name_of[id(ms.model_param)], ms.start, ms.end,
                      None if ms.shard_is_view else ms.main_param.data, dict(ms.state()))
                     for ms in main_states(self.optimizer)],
            **self.step_state(),
            "caches": optimizer_caches(self.optimizer),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Write ``state_dict``'s result into objects built the same way (the same parameters,
        buffers and optimizer layout), bit for bit."""
        from megatron.core.utils import unwrap_model

        params = named_model_params(self.model)
        if list(params) != list(state["params"]):
            raise RuntimeError("load_state_dict: the rebuilt model's parameters differ from "
                               "the kept model's")
        for name, p in params.items():
            p.data.copy_(state["params"][name])
        for kept, chunk in zip(state["buffers"], unwrap_model(list(self.model))):
            for name, b in chunk.named_buffers():
                b.copy_(kept[name])
        ensure_optimizer_state(self.optimizer)
        name_of = {id(p): n for n, p in params.items()}
        new_states = list(main_states(self.optimizer))
        if [(n, a, b) for n, a, b, _, _ in state["main"]] != [
                (name_of[id(ms.model_param)], ms.start, ms.end) for ms in new_states]:
            raise RuntimeError("load_state_dict: the rebuilt optimizer's layout differs from "
                               "the kept one")
        for (_, _, _, main, kept_state), ms in zip(state["main"], new_states):
            if main is not None and not ms.shard_is_view:
                ms.main_param.copy_(main)
            target = ms.optimizer.optimizer.state[ms.main_param]
            for key, value in kept_state.items():
                if torch.is_tensor(value) and torch.is_tensor(target.get(key)):
                    target[key].copy_(value)
                else:
                    target[key] = value.clone() if torch.is_tensor(value) else value
        self.load_step_state(state)
        restore_optimizer_caches(self.optimizer, state["caches"])

    # ------------------------------------------------------------------ per-iteration state
    def step_state(self) -> dict:
        """What changes with every optimizer step besides the tensors: scheduler counters,
        parameter-group fields, grad scalers and the loss scale (a snapshot slot's metadata)."""
        scalers = [None if getattr(sub, "grad_scaler", None) is None
                   else sub.grad_scaler.state_dict() for sub in sub_optimizers(self.optimizer)]
        scale = self.optimizer.get_loss_scale()
        return {"scheduler": ({} if self.scheduler is None else dict(self.scheduler.state_dict())),
                "param_groups": param_group_state(self.optimizer),
                "grad_scalers": scalers,
                "loss_scale": float(scale.item() if torch.is_tensor(scale) else scale)}

    def load_step_state(self, meta: dict) -> None:
        """Restore ``step_state``'s scheduler counters, then every parameter-group field (the
        learning rate and weight decay the scheduler had set included), then the scalers."""
        if self.scheduler is not None:
            # OptimizerParamScheduler.load_state_dict *adds* the saved step count
            # (step(increment=n)), as it expects a fresh scheduler; start from zero so the
            # result is the saved count.
            self.scheduler.num_steps = 0
            self.scheduler.load_state_dict(dict(meta["scheduler"]))
        restore_param_groups(self.optimizer, meta["param_groups"])
        for sub, saved in zip(sub_optimizers(self.optimizer), meta["grad_scalers"]):
            if getattr(sub, "grad_scaler", None) is not None and saved is not None:
                sub.grad_scaler.load_state_dict(saved)

    # ------------------------------------------------------------------ checks and faults
    @torch.no_grad()
    def fingerprint(self) -> int:
        """An order-independent checksum of parameters, main weights and optimizer state, used
        to check that a replay brought a surviving rank back to exactly the state it had."""
        total = torch.zeros((), dtype=torch.int64)
        for chunk in self.model:
            for p in chunk.parameters():
                total = total + _tensor_sum(p).cpu()
        for ms in main_states(self.optimizer):
            if not ms.shard_is_view:
                total = total + _tensor_sum(ms.main_param).cpu()
            for value in ms.state().values():
                if torch.is_tensor(value):
                    total = total + _tensor_sum(value).cpu()
        return int(total)

    @torch.no_grad()
    def wipe(self, buffers: list[tuple[str, torch.Tensor]]) -> None:
        """``lose_state``: destroy the state in place (parameters, the given buffers, main
        weights, optimizer state, scheduler counters, parameter groups, RNG streams), so that
        anything a recovery fails to restore shows up in the bitwise comparison. Buffers that
        are state (the operators' captured buffers) are wiped; constant non-persistent buffers
        (RoPE frequencies) are what a restarted process would rebuild from code."""
        for chunk in self.model:
            for p in chunk.parameters():
                _garbage(p.data)
        for _, b in buffers:
            _garbage(b)
        for ms in main_states(self.optimizer):
            if not ms.shard_is_view:
                _garbage(ms.main_param.data)
            for value in ms.state().values():
                if torch.is_tensor(value):
                    _garbage(value)
        if self.scheduler is not None:
            self.scheduler.num_steps = -12345
        for group in self.optimizer.param_groups:
            group["lr"] = 0.5
            if "step" in group:  # FusedAdam's group-level step
                group["step"] = 12345
        rng_state.scramble_rng()

    # ------------------------------------------------------------------ for the oracle
    def named_tensors(self) -> dict[str, torch.Tensor]:
        """``param/chunk{c}.<name>``, ``buffer/chunk{c}.<name>`` and
        ``optim{i}/<param>[start:end]/main|exp_avg|...``: every tensor the rank holds, by name
        (detached views, not copies)."""
        from megatron.core.utils import unwrap_model

        named = named_model_params(self.model)
        name_of = {id(p): n for n, p in named.items()}
        tensors = {f"param/{n}": p.detach() for n, p in named.items()}
        for c, chunk in enumerate(unwrap_model(list(self.model))):
            for name, buf in chunk.named_buffers():
                tensors[f"buffer/chunk{c}.{name}"] = buf.detach()
        for ms in main_states(self.optimizer):
            base = (f"optim{ms.sub_index}/{name_of.get(id(ms.model_param), '?')}"
                    f"[{ms.start}:{ms.end}]")
            if not ms.shard_is_view:
                tensors[f"{base}/main"] = ms.main_param.detach()
            for key, value in sorted(ms.state().items()):
                if torch.is_tensor(value):
                    tensors[f"{base}/{key}"] = value.detach()
                else:
                    tensors[f"{base}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
        return tensors

    def oracle_state(self, args=None) -> tuple[dict, dict]:
        """``(tensors, scalars)`` for the determinism oracle: ``named_tensors``, the RNG streams
        (``rng/cpu``, ``rng/cuda``, ``rng/tracker/<stream>``, ``rng/python``, ``rng/numpy``),
        and as exact scalars every parameter-group field (``optim{i}/group{g}/<field>``, with
        ``num_params``), ``scheduler/<key>``, ``grad_scaler/optim{i}/<key>``, ``loss_scale``,
        ``consumed_train_samples`` and ``skipped_train_samples`` (tensor-valued fields go with
        the tensors). ``args``: Megatron's parsed arguments (``get_args()`` when None)."""
        tensors: dict[str, torch.Tensor] = dict(self.named_tensors())
        scalars: dict[str, Any] = {}
        for i, sub in enumerate(sub_optimizers(self.optimizer)):
            inner = getattr(sub, "optimizer", None)
            if getattr(sub, "is_stub_optimizer", False) or inner is None:
                continue
            for g, group in enumerate(inner.param_groups):
                scalars[f"optim{i}/group{g}/num_params"] = len(group["params"])
                for key, value in group.items():
                    if key != "params":
                        _put(tensors, scalars, f"optim{i}/group{g}/{key}", value)
        step = self.step_state()
        for key, value in step["scheduler"].items():
            _put(tensors, scalars, f"scheduler/{key}", value)
        for i, state in enumerate(step["grad_scalers"]):
            if state is None:
                scalars[f"grad_scaler/optim{i}"] = None
            for key, value in (state or {}).items():
                _put(tensors, scalars, f"grad_scaler/optim{i}/{key}", value)
        scalars["loss_scale"] = step["loss_scale"]
        rng = rng_state.capture_rng()
        tensors["rng/cpu"] = rng["cpu"]
        if "cuda" in rng:
            tensors["rng/cuda"] = rng["cuda"]
        for name, state in rng["tracker"].items():
            tensors[f"rng/tracker/{name}"] = state
        tensors["rng/python"] = rng_state.python_rng_tensor()
        numpy_state = rng_state.numpy_rng_tensor()
        if numpy_state is not None:
            tensors["rng/numpy"] = numpy_state
        if args is None:
            from megatron.training import get_args

            args = get_args()
        scalars["consumed_train_samples"] = int(args.consumed_train_samples)
        scalars["skipped_train_samples"] = int(getattr(args, "skipped_train_samples", 0))
        return tensors, scalars
