"""A rank's random-number streams: capture, restore, compare, and keep them beside a checkpoint.

The streams exact replay needs: torch's CPU generator, the CUDA generator (where there is one),
and every stream of Megatron's ``CudaRNGStatesTracker`` (tensor-parallel, expert-parallel,
data-parallel). Python's and numpy's generators are added where the whole process state is
kept (a checkpoint's, the oracle's).
"""

from __future__ import annotations

import os
import random

import torch


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


def scramble_rng() -> None:
    """Fault injection: valid generator states that are not the ones the rank had."""
    from megatron.core.tensor_parallel.random import _get_cuda_rng_state, get_cuda_rng_tracker

    torch.manual_seed(0xDEAD)  # also reseeds the CUDA generator
    garbage = _get_cuda_rng_state(clone=True)
    tracker = get_cuda_rng_tracker()
    tracker.set_states({k: garbage.clone() for k in tracker.get_states()})


def python_rng_tensor() -> torch.Tensor:
    """Python's ``random`` state as one int64 tensor (for bitwise comparison)."""
    version, internal, gauss = random.getstate()
    gauss_bits = torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)
    return torch.cat([torch.tensor([version, *internal, gauss is not None], dtype=torch.int64),
                      gauss_bits.view(torch.int64)])


def numpy_rng_tensor() -> torch.Tensor | None:
    """numpy's global generator state as one int64 tensor, or None without numpy."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    head = torch.tensor([pos, has_gauss], dtype=torch.int64)
    return torch.cat([head, torch.from_numpy(keys.astype(np.int64)),
                      torch.tensor([cached], dtype=torch.float64).view(torch.int64)])


# Megatron's own checkpoint keeps the RNG of data-parallel rank 0 of each model-parallel rank
# only (``checkpointing.get_rng_state`` without --data-parallel-random-init): with expert
# parallelism, ranks of another expert-parallel rank get their partner's expert-parallel stream.
# And it restores the RNG before the data iterators are built, whose ``iter(DataLoader)`` draws
# from the CPU generator (also the "CUDA" one on CPU). So each rank keeps its own streams beside
# the checkpoint and ``pretrain()`` restores them once the iterators exist (the session's set-up).
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
