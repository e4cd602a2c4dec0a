"""The bitwise determinism oracle: dump a run's observable state and compare two dumps exactly.

A dump directory holds, per rank, ``rank{R}.iterations.jsonl`` (per iteration: losses, grad
norm, skipped flag, floats stored as ``float.hex`` so they round-trip exactly) and
``rank{R}.state.pt`` (the final parameters and optimizer state as named CPU tensors).
``compare_dumps`` walks ranks in order and reports the first record or tensor that differs,
naming the rank; equality is bitwise (bytes of the tensors, dtypes and shapes included).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

_ITER_FILE = "rank{rank}.iterations.jsonl"
_STATE_FILE = "rank{rank}.state.pt"


def _hex(value: float | None) -> str | None:
    return None if value is None else float(value).hex()


def _unhex(value: str | None) -> float | None:
    return None if value is None else float.fromhex(value)


class OracleRecorder:
    """Writes one rank's part of a dump.

    Args:
        directory: the dump directory (created if missing).
        rank: this process's global rank.
    """

    def __init__(self, directory: str | os.PathLike, rank: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._iter_path = self.directory / _ITER_FILE.format(rank=rank)

    def record_iteration(self, iteration: int, losses: dict[str, float],
                         grad_norm: float | None, skipped: int) -> None:
        """Append one iteration's observable results (called once per committed iteration)."""
        record = {
            "iteration": int(iteration),
            "losses": {k: _hex(v) for k, v in sorted(losses.items())},
            "grad_norm": _hex(grad_norm),
            "skipped": int(skipped),
        }
        with open(self._iter_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def dump_state(self, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Write the final named tensors (copied to CPU) and free-form metadata."""
        path = self.directory / _STATE_FILE.format(rank=self.rank)
        payload = {
            "meta": dict(meta or {}),
            "tensors": {k: v.detach().to("cpu", copy=True).contiguous()
                        for k, v in tensors.items()},
        }
        torch.save(payload, path)
        return path


@dataclass
class RankDump:
    """One rank's records: ``iterations[i]`` is the last record written for iteration i."""

    rank: int
    iterations: dict[int, dict] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


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
    for path in sorted(directory.glob("rank*.state.pt")):
        rank = int(re.match(r"rank(\d+)\.", path.name).group(1))
        payload = torch.load(path, map_location="cpu", weights_only=True)
        dump = ranks.setdefault(rank, RankDump(rank))
        dump.tensors, dump.meta = payload["tensors"], payload.get("meta", {})
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


@dataclass
class Comparison:
    """Result of comparing two dumps; ``identical`` is the verdict."""

    identical: bool
    first_difference: str = ""
    ranks: int = 0
    iterations: int = 0
    tensors: int = 0
    elements: int = 0

    def __str__(self) -> str:
        if self.identical:
            return (f"bitwise identical: {self.ranks} ranks, {self.iterations} iteration records, "
                    f"{self.tensors} tensors ({self.elements} elements)")
        return f"DIFFERENT: {self.first_difference}"


def _describe_tensor_difference(name: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{name}: dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.numel() == 0:
        return None
    a_bytes = a.contiguous().view(-1).view(torch.uint8)
    b_bytes = b.contiguous().view(-1).view(torch.uint8)
    if torch.equal(a_bytes, b_bytes):
        return None
    flat_a, flat_b = a.contiguous().view(-1), b.contiguous().view(-1)
    if flat_a.is_floating_point():
        differs = flat_a.view(torch.uint8).view(-1, flat_a.element_size()).ne(
            flat_b.view(torch.uint8).view(-1, flat_b.element_size())).any(dim=1)
        first = int(differs.nonzero()[0])
        count = int(differs.sum())
        max_abs = float((flat_a.double() - flat_b.double()).abs().nan_to_num(math.inf).max())
        return (f"{name}: {count} of {flat_a.numel()} elements differ; first at flat index "
                f"{first} ({flat_a[first].item()!r} vs {flat_b[first].item()!r}); "
                f"max |a-b| = {max_abs:.3e}")
    differs = flat_a.ne(flat_b)
    first = int(differs.nonzero()[0])
    return (f"{name}: {int(differs.sum())} of {flat_a.numel()} elements differ; first at "
            f"flat index {first} ({flat_a[first].item()!r} vs {flat_b[first].item()!r})")


def compare_dumps(a: str | os.PathLike | dict, b: str | os.PathLike | dict,
                  *, check_iterations: bool = True, check_tensors: bool = True) -> Comparison:
    """Compare two dumps bitwise; report the first rank and record or tensor that differs."""
    dumps_a = a if isinstance(a, dict) else load_dump(a)
    dumps_b = b if isinstance(b, dict) else load_dump(b)
    result = Comparison(identical=True, ranks=len(dumps_a))
    if sorted(dumps_a) != sorted(dumps_b):
        return Comparison(False, f"ranks differ: {sorted(dumps_a)} vs {sorted(dumps_b)}")
    if not dumps_a:
        return Comparison(False, "no rank records found in the dumps")
    for rank in dumps_a:
        da, db = dumps_a[rank], dumps_b[rank]
        if check_iterations:
            if sorted(da.iterations) != sorted(db.iterations):
                return Comparison(False, f"rank {rank}: iterations recorded differ: "
                                         f"{sorted(da.iterations)} vs {sorted(db.iterations)}")
            for it in sorted(da.iterations):
                ra, rb = da.iterations[it], db.iterations[it]
                for key in ("losses", "grad_norm", "skipped"):
                    if ra[key] != rb[key]:
                        return Comparison(
                            False, f"rank {rank}, iteration {it}: {key} {_pretty(ra[key])} vs "
                                   f"{_pretty(rb[key])}")
                result.iterations += 1
        if check_tensors:
            if sorted(da.tensors) != sorted(db.tensors):
                only_a = sorted(set(da.tensors) - set(db.tensors))[:3]
                only_b = sorted(set(db.tensors) - set(da.tensors))[:3]
                return Comparison(False, f"rank {rank}: tensor names differ (only in a: {only_a}, "
                                         f"only in b: {only_b})")
            for name in sorted(da.tensors):
                diff = _describe_tensor_difference(name, da.tensors[name], db.tensors[name])
                if diff is not None:
                    return Comparison(False, f"rank {rank}, tensor {diff}")
                result.tensors += 1
                result.elements += da.tensors[name].numel()
    return result


def _pretty(value):
    if isinstance(value, dict):
        return {k: _pretty(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return repr(float.fromhex(value))
        except ValueError:
            return value
    return value
