"""The small state exact replay needs besides weights: RNG streams, LR scheduler, parameter
groups, grad scaler.

RNG: torch's CPU generator, the CUDA generator, and Megatron's ``CudaRNGStatesTracker``
streams (tensor-parallel, expert-parallel, data-parallel). LR scheduler: the
``OptimizerParamScheduler`` state dict, restored together with every field of the optimizer's
parameter groups: the learning rate and weight decay it sets, and the group-level ``step`` that
Transformer Engine's and Apex's FusedAdam keep instead of a per-parameter one (their bias
correction reads it). Grad scaler: one state dict per sub-optimizer (fp16 loss scaling), or None.
"""

from __future__ import annotations

import copy
import os
import random

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


# Megatron's own checkpoint keeps the RNG of data-parallel rank 0 of each model-parallel rank
# only (``checkpointing.get_rng_state`` without --data-parallel-random-init): with expert
# parallelism, ranks of another expert-parallel rank get their partner's expert-parallel stream.
# And it restores the RNG before the data iterators are built, whose ``iter(DataLoader)`` draws
# from the CPU generator (also the "CUDA" one on CPU). So each rank keeps its own streams beside
# the checkpoint and ``pretrain()`` restores them once the iterators exist (``setup``).
CHECKPOINT_RNG_DIR = "moetion_rng"


def _checkpoint_rng_path(directory: str, iteration: int, rank: int) -> str:
    return os.path.join(directory, CHECKPOINT_RNG_DIR, f"iter_{iteration:07d}",
                        f"rank{rank}.pt")


def save_checkpoint_rng(directory: str, iteration: int, rank: int) -> None:
    """Write this rank's RNG streams (torch, tracker, Python, numpy) beside the checkpoint."""
    import numpy as np

    path = _checkpoint_rng_path(directory, iteration, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"torch": capture_rng(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def restore_checkpoint_rng(directory: str, iteration: int, rank: int) -> bool:
    """Restore what ``save_checkpoint_rng`` wrote for ``iteration``; False if it is not there
    (a checkpoint written without MoEtion)."""
    import numpy as np

    path = _checkpoint_rng_path(directory, iteration, rank)
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)
    restore_rng(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    return True


def scheduler_state(scheduler) -> dict:
    return dict(scheduler.state_dict()) if scheduler is not None else {}


def _copy_value(value):
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


def param_group_state(optimizer) -> list[dict]:
    """Every field of every parameter group except its parameters, in order (``lr``,
    ``weight_decay``, ``betas``, ``eps``, ..., and ``step`` where the optimizer keeps it per
    group), copied."""
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


def restore_scheduler(scheduler, optimizer, state: dict, groups: list[dict]) -> None:
    """Restore the scheduler's counters, then every parameter-group field (the learning rate
    and weight decay the scheduler had set included)."""
    if scheduler is not None:
        # OptimizerParamScheduler.load_state_dict *adds* the saved step count
        # (step(increment=n)), as it expects a fresh scheduler; start from zero so the result
        # is the saved count.
        scheduler.num_steps = 0
        scheduler.load_state_dict(dict(state))
    restore_param_groups(optimizer, groups)


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
