"""The determinism oracle's dumps: what each rank of a run writes, and reading it back.

A dump directory holds, per rank ``R``:

* ``rank{R}.iterations.jsonl``: one record per committed iteration: ``lm loss`` (the losses
  of Megatron's ``loss_dict``, on the last pipeline stage), the MoE auxiliary losses and MTP
  losses this rank accumulated in the iteration (per layer), the grad norm and the skipped flag.
  Floats are stored as ``float.hex``, so they round-trip exactly. Megatron's
  ``num_zeros_in_grad`` is not recorded: ``train_step`` returns it to the training loop only,
  the hook does not receive it, and it is computed at all only under
  ``--log-num-zeros-in-grad``.
* ``rank{R}.state.iter{T}.pt``: the rank's whole state after the optimizer step of every
  committed iteration ``T`` with ``T % K == 0`` (``K`` = ``--moetion-oracle-interval``,
  default 4; 0 turns these off), and ``rank{R}.state.pt``: the same at the end of training. A state is
  named tensors (parameters, main weights, every optimizer state tensor, every module buffer,
  every RNG stream) plus exact scalars (every parameter-group field of every sub-optimizer, the
  LR scheduler's state, grad scalers and loss scale, consumed samples); see
  ``adapter.rank_state`` for the full list.

The state interval is a fixed iteration count, not MoEtion's window schedule: the oracle also
runs with ``--moetion`` off, and the iterations it samples must be the same in a run with
failures and in its fault-free twin. Only committed iterations are recorded (the hook runs once
per iteration the training loop completes; replays during a recovery never reach it); an
iteration run again after a restart from a checkpoint overwrites its earlier record and state,
so the last one wins.

``oracle.compare_dumps`` compares two dumps.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_ITER_FILE = "rank{rank}.iterations.jsonl"
FINAL_FILE = "rank{rank}.state.pt"
_SNAPSHOT_FILE = "rank{rank}.state.iter{iteration:07d}.pt"
_STATE_RE = re.compile(r"rank(\d+)\.state(?:\.iter(\d+))?\.pt")

DEFAULT_INTERVAL = 4


def _hex(value: float | None) -> str | None:
    return None if value is None else float(value).hex()


def _unhex(value: str | None) -> float | None:
    return None if value is None else float.fromhex(value)


def exact(value: Any) -> Any:
    """``value`` as plain JSON-like data that compares equal exactly when ``value`` does:
    floats as ``float.hex``, tuples as lists, tensors as dtype, shape and raw bytes."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value).hex()
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    if isinstance(value, dict):
        return {str(k): exact(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if torch.is_tensor(value):
        t = value.detach().to("cpu").contiguous()
        return {"dtype": str(t.dtype), "shape": list(t.shape),
                "bytes": t.view(-1).view(torch.uint8).numpy().tobytes().hex()}
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return exact(dataclasses.asdict(value))
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    # an object without a value semantics: compare its type only (its repr may hold an address)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


class OracleRecorder:
    """Writes one rank's part of a dump.

    Args:
        directory: the dump directory (created if missing).
        rank: this process's global rank.
        interval: ``K`` (state after every iteration ``t % K == 0``; 0: final state only;
            ``--moetion-oracle-interval``).
    """

    def __init__(self, directory: str | os.PathLike, rank: int,
                 interval: int = DEFAULT_INTERVAL):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        if interval < 0:
            raise ValueError(f"--moetion-oracle-interval must be an integer >= 0; got {interval}")
        self.interval = int(interval)
        self._iter_path = self.directory / _ITER_FILE.format(rank=rank)

    def wants_state(self, iteration: int) -> bool:
        """Whether the state after committed ``iteration`` belongs in the dump."""
        return self.interval > 0 and iteration % self.interval == 0

    def record_iteration(self, iteration: int, losses: dict[str, float],
                         grad_norm: float | None, skipped: int,
                         metrics: dict[str, dict[str, list[float]]] | None = None) -> None:
        """Append one iteration's observable results (called once per committed iteration).

        ``metrics``: ``{"moe": {name: per-layer values}, "mtp": {...}}`` (auxiliary losses).
        """
        record = {
            "iteration": int(iteration),
            "losses": {k: _hex(v) for k, v in sorted(losses.items())},
        }
        for group, values in sorted((metrics or {}).items()):
            record[group] = {k: [_hex(x) for x in v] for k, v in sorted(values.items())}
        record["grad_norm"] = _hex(grad_norm)
        record["skipped"] = int(skipped)
        with open(self._iter_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def dump_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any] | None = None,
                   meta: dict | None = None, *, iteration: int | None = None) -> Path:
        """Write named tensors (copied to CPU), exact scalars and free-form metadata: the state
        after committed ``iteration``, or the final state when ``iteration`` is None."""
        name = (FINAL_FILE.format(rank=self.rank) if iteration is None
                else _SNAPSHOT_FILE.format(rank=self.rank, iteration=int(iteration)))
        path = self.directory / name
        payload = {
            "iteration": None if iteration is None else int(iteration),
            "meta": dict(meta or {}),
            "scalars": {k: exact(v) for k, v in (scalars or {}).items()},
            "tensors": {k: v.detach().to("cpu", copy=True).contiguous()
                        for k, v in tensors.items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a process killed while writing leaves no half-written state
        return path


@dataclass
class StateSnapshot:
    """One rank's state at one point: named tensors and exact scalars."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class RankDump:
    """One rank's records: ``iterations[i]`` is the last record written for iteration i,
    ``states[i]`` the state after iteration i, ``final`` the state at the end."""

    rank: int
    iterations: dict[int, dict] = field(default_factory=dict)
    states: dict[int, StateSnapshot] = field(default_factory=dict)
    final: StateSnapshot | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.final.tensors if self.final is not None else {}

    @property
    def scalars(self) -> dict[str, Any]:
        return self.final.scalars if self.final is not None else {}

    @property
    def meta(self) -> dict:
        return self.final.meta if self.final is not None else {}


def load_dump(directory: str | os.PathLike) -> dict[int, RankDump]:
    """Load every rank's records from a dump directory."""
    directory = Path(directory)
    ranks: dict[int, RankDump] = {}
    for path in sorted(directory.glob("rank*.iterations.jsonl")):
        rank = int(re.match(r"rank(\d+)\.", path.name).group(1))
        dump = ranks.setdefault(rank, RankDump(rank))
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                dump.iterations[rec["iteration"]] = rec  # a replayed iteration overwrites
    for path in sorted(directory.glob("rank*.state*.pt")):
        match = _STATE_RE.fullmatch(path.name)
        if match is None:
            continue
        rank = int(match.group(1))
        payload = torch.load(path, map_location="cpu", weights_only=True)
        snap = StateSnapshot(payload["tensors"], payload.get("scalars", {}),
                             payload.get("meta", {}))
        dump = ranks.setdefault(rank, RankDump(rank))
        if match.group(2) is None:
            dump.final = snap
        else:
            dump.states[int(match.group(2))] = snap
    for dump in ranks.values():
        dump.states = dict(sorted(dump.states.items()))
    return dict(sorted(ranks.items()))


def losses_by_iteration(dumps: dict[int, RankDump], key: str = "lm loss") -> dict[int, float]:
    """Per-iteration loss as reported by the ranks that compute it (the last pipeline stage)."""
    out: dict[int, float] = {}
    for dump in dumps.values():
        for it, rec in sorted(dump.iterations.items()):
            value = rec["losses"].get(key)
            if value is not None and it not in out:
                out[it] = _unhex(value)
    return dict(sorted(out.items()))
