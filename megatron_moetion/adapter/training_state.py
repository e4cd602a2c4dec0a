"""The small state exact replay needs besides weights: RNG streams, LR scheduler, grad scaler.

RNG: torch's CPU generator, the CUDA generator, and Megatron's ``CudaRNGStatesTracker``
streams (tensor-parallel, expert-parallel, data-parallel). LR scheduler: the
``OptimizerParamScheduler`` state dict, restored together with the learning rate and weight
decay it sets on the optimizer's parameter groups. Grad scaler: one state dict per
sub-optimizer (fp16 loss scaling), or None.
"""

from __future__ import annotations

import torch

from megatron_moetion.adapter.optimizer_state import sub_optimizers


def capture_rng() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state().clone(),
             "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().clone()
    return state


def restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"].clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].clone())
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def rng_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b) or set(a["tracker"]) != set(b["tracker"]):
        return False
    return (torch.equal(a["cpu"], b["cpu"])
            and all(torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"])
            and ("cuda" not in a or torch.equal(a["cuda"], b["cuda"])))


def scheduler_state(scheduler) -> dict:
    return dict(scheduler.state_dict()) if scheduler is not None else {}


def param_group_hparams(optimizer) -> list[tuple[float, float]]:
    """(lr, weight_decay) of every parameter group, in order."""
    return [(float(g["lr"]), float(g.get("weight_decay", 0.0))) for g in optimizer.param_groups]


def restore_scheduler(scheduler, optimizer, state: dict, hparams) -> None:
    """Restore the scheduler's counters and the values it had set on the parameter groups."""
    if scheduler is None:
        return
    # OptimizerParamScheduler.load_state_dict *adds* the saved step count (step(increment=n)),
    # as it expects a fresh scheduler; start from zero so the result is the saved count.
    scheduler.num_steps = 0
    scheduler.load_state_dict(dict(state))
    for group, (lr, wd) in zip(optimizer.param_groups, hparams):
        group["lr"] = lr
        if "weight_decay" in group:
            group["weight_decay"] = wd


def grad_scaler_states(optimizer) -> list:
    out = []
    for sub in sub_optimizers(optimizer):
        scaler = getattr(sub, "grad_scaler", None)
        out.append(None if scaler is None else scaler.state_dict())
    return out


def restore_grad_scalers(optimizer, states: list) -> None:
    for sub, state in zip(sub_optimizers(optimizer), states):
        scaler = getattr(sub, "grad_scaler", None)
        if scaler is not None and state is not None:
            scaler.load_state_dict(state)


def loss_scale(optimizer) -> float:
    scale = optimizer.get_loss_scale()
    return float(scale.item() if torch.is_tensor(scale) else scale)


def capture_buffers(buffers: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in buffers}


@torch.no_grad()
def restore_buffers(buffers: list[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor]):
    for name, b in buffers:
        b.copy_(saved[name])


@torch.no_grad()
def state_fingerprint(model_chunks, optimizer) -> int:
    """An order-independent checksum of parameters, main weights and optimizer state, used to
    check that a replay brought a surviving rank back to exactly the state it had."""
    from megatron_moetion.adapter.optimizer_state import main_states

    def tensor_sum(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().contiguous().view(-1)
        raw = flat.view(torch.int16) if flat.element_size() >= 2 else flat.view(torch.uint8)
        wide = raw.to(torch.int64)
        return wide.sum() * 1_000_003 + (wide * wide).sum()

    total = torch.zeros((), dtype=torch.int64)
    for chunk in model_chunks:
        for p in chunk.parameters():
            total = total + tensor_sum(p).cpu()
    for ms in main_states(optimizer):
        if not ms.shard_is_view:
            total = total + tensor_sum(ms.main_param).cpu()
        for value in ms.state().values():
            if torch.is_tensor(value):
                total = total + tensor_sum(value).cpu()
    return int(total)
