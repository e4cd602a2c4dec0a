"""The bitwise determinism oracle: dump everything a run's ranks hold and compare two dumps exactly.

``oracle_dump`` writes a dump, one ``OracleRecorder`` per rank, and reads it back
(``load_dump``); its docstring lists the files. This module compares two dumps and re-exports
the dump side, so callers import the whole oracle from here.

``compare_dumps`` compares every rank's records and states bit for bit and reports every
difference, named by rank, snapshot (``iteration T``, ``state at iteration T`` or ``final``)
and field; structural problems (no state at all, a missing rank, a rank without a state file,
different record or snapshot counts, different field sets) make the verdict DIFFERENT too,
never "identical".
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_moetion.oracle_dump import (
    FINAL_FILE,
    OracleRecorder,
    RankDump,
    StateSnapshot,
    exact,
    load_dump,
    losses_by_iteration,
)

__all__ = ["Comparison", "OracleRecorder", "RankDump", "StateSnapshot", "compare_dumps", "exact",
           "load_dump", "losses_by_iteration"]


# Field kinds in report order: the small state first (a cascade of damage changes every
# parameter; the field that started it is usually one of these).
_KINDS = ("iteration/", "consumed_train_samples", "skipped_train_samples", "scheduler/",
          "loss_scale", "grad_scaler/", "optim*/group", "rng/", "buffer/", "optim", "param/")
_LISTED_FIELDS = 24


def _kind(name: str) -> int:
    for i, prefix in enumerate(_KINDS):
        if prefix == "optim*/group":
            if re.match(r"optim\d+/group\d+/", name):
                return i
        elif name.startswith(prefix):
            return i
    return len(_KINDS)


@dataclass
class Comparison:
    """Result of comparing two dumps; ``identical`` is the verdict.

    ``differences`` lists every difference (earliest iteration first, then by rank), each
    naming rank, snapshot and field; ``fields`` the differing field names; the counts say
    what was compared.
    """

    identical: bool
    first_difference: str = ""
    differences: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    ranks: int = 0
    iterations: int = 0
    snapshots: int = 0
    tensors: int = 0
    elements: int = 0
    scalars: int = 0

    def counts(self) -> str:
        return (f"{self.ranks} ranks, {self.iterations} iteration records, {self.snapshots} "
                f"state snapshots, {self.tensors} tensors ({self.elements} elements), "
                f"{self.scalars} scalar fields")

    def summary(self) -> dict:
        """The verdict and the counts, for JSON reports."""
        return {"identical": self.identical, "ranks": self.ranks,
                "iteration_records": self.iterations, "state_snapshots": self.snapshots,
                "tensors": self.tensors, "elements": self.elements,
                "scalar_fields": self.scalars, "differences": len(self.differences),
                "differing_fields": list(self.fields),
                "first_difference": self.first_difference}

    def __str__(self) -> str:
        if self.identical:
            return f"bitwise identical: {self.counts()}"
        text = f"DIFFERENT: {self.first_difference}"
        if len(self.differences) > 1:
            text += f"; {len(self.differences)} differences in all"
        if self.fields:
            listed = ", ".join(self.fields[:_LISTED_FIELDS])
            more = len(self.fields) - _LISTED_FIELDS
            text += f"; fields: {listed}" + (f" (+{more} more)" if more > 0 else "")
        return f"{text}; compared {self.counts()}"


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


def _names_differ(what: str, a, b) -> tuple[str, list] | None:
    """``(description, names in one only)`` when the key sets of ``a`` and ``b`` differ."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if not only_a and not only_b:
        return None
    return (f"{what} differ: {len(a)} vs {len(b)} (only in a: {only_a[:3]}"
            f"{' ...' if len(only_a) > 3 else ''}, only in b: {only_b[:3]}"
            f"{' ...' if len(only_b) > 3 else ''})", only_a + only_b)


def _flat_record(rec: dict) -> dict[str, Any]:
    out = {}
    for key, value in rec.items():
        if key == "iteration":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}/{sub}"] = v
        else:
            out[key] = value
    return out


def _describe_value_difference(a, b) -> str:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        count = sum(x != y for x, y in zip(a, b))
        return (f"{count} of {len(a)} values differ; first at index {first} "
                f"({_pretty(a[first])} vs {_pretty(b[first])})")
    return f"{_pretty(a)} vs {_pretty(b)}"


class _Differences:
    """Differences with their sort key: (iteration, rank, field kind, order found)."""

    def __init__(self):
        self.items: list[tuple[tuple, str, str | None]] = []

    def add(self, when: float, rank: int, text: str, *names: str) -> None:
        kind = min((_kind(n) for n in names), default=-1)
        self.items.append(((when, rank, kind, len(self.items)), text, names))

    def into(self, result: Comparison) -> Comparison:
        self.items.sort(key=lambda item: item[0])
        result.differences = [text for _, text, _ in self.items]
        names = {name for _, _, item_names in self.items for name in item_names}
        result.fields = sorted(names, key=lambda n: (_kind(n), n))
        result.identical = not self.items
        result.first_difference = result.differences[0] if self.items else ""
        return result


def _compare_snapshot(rank: int, label: str, when: float, sa: StateSnapshot,
                      sb: StateSnapshot, result: Comparison, diffs: _Differences) -> None:
    for what, a, b in (("scalar fields", sa.scalars, sb.scalars),
                       ("tensor names", sa.tensors, sb.tensors)):
        problem = _names_differ(what, a, b)
        if problem is not None:
            diffs.add(when, rank, f"rank {rank}, {label}: {problem[0]}", *problem[1])
    for name in sorted(set(sa.scalars) & set(sb.scalars), key=lambda n: (_kind(n), n)):
        if sa.scalars[name] != sb.scalars[name]:
            diffs.add(when, rank, f"rank {rank}, {label}, {name}: "
                                  f"{_describe_value_difference(sa.scalars[name], sb.scalars[name])}",
                      name)
        result.scalars += 1
    for name in sorted(set(sa.tensors) & set(sb.tensors), key=lambda n: (_kind(n), n)):
        diff = _describe_tensor_difference(name, sa.tensors[name], sb.tensors[name])
        if diff is not None:
            diffs.add(when, rank, f"rank {rank}, {label}, {diff}", name)
        result.tensors += 1
        result.elements += sa.tensors[name].numel()
    result.snapshots += 1


def _compare_records(rank: int, da: RankDump, db: RankDump, result: Comparison,
                     diffs: _Differences) -> None:
    problem = _names_differ("iteration records", da.iterations, db.iterations)
    if problem is not None:
        diffs.add(-1, rank, f"rank {rank}: {problem[0]}")
    for it in sorted(set(da.iterations) & set(db.iterations)):
        ra, rb = _flat_record(da.iterations[it]), _flat_record(db.iterations[it])
        problem = _names_differ("record fields", ra, rb)
        if problem is not None:
            diffs.add(it, rank, f"rank {rank}, iteration {it}: {problem[0]}",
                      *(f"iteration/{k}" for k in problem[1]))
        for key in [k for k in ra if k in rb]:
            if ra[key] != rb[key]:
                diffs.add(it, rank, f"rank {rank}, iteration {it}: {key} "
                                    f"{_describe_value_difference(ra[key], rb[key])}",
                          f"iteration/{key}")
        result.iterations += 1


def compare_dumps(a: str | os.PathLike | dict, b: str | os.PathLike | dict,
                  *, check_iterations: bool = True, check_state: bool = True) -> Comparison:
    """Compare two dumps bitwise (``a``, ``b``: dump directories or ``load_dump`` results).

    Every difference is reported (``Comparison.differences``, earliest iteration first);
    the verdict is DIFFERENT as well when the dumps cannot show identity: no records or no
    tensors at all, different ranks, a rank without its final state file, different numbers
    of iteration records or state snapshots, different field sets.
    """
    diffs = _Differences()
    loaded = []
    for side, d in (("a", a), ("b", b)):
        if not isinstance(d, dict) and not Path(d).is_dir():
            diffs.add(-2, -1, f"dump {side}: no such directory: {d}")
        loaded.append(d if isinstance(d, dict) else load_dump(d))
    dumps_a, dumps_b = loaded
    result = Comparison(identical=True, ranks=len(set(dumps_a) & set(dumps_b)))
    if not dumps_a and not dumps_b:
        diffs.add(-2, -1, "no rank records found in the dumps")
    elif sorted(dumps_a) != sorted(dumps_b):
        diffs.add(-2, -1, f"ranks differ: {sorted(dumps_a)} vs {sorted(dumps_b)}")
    for rank in sorted(set(dumps_a) & set(dumps_b)):
        da, db = dumps_a[rank], dumps_b[rank]
        if check_iterations:
            _compare_records(rank, da, db, result, diffs)
        if not check_state:
            continue
        for side, d in (("a", da), ("b", db)):
            if d.final is None:
                diffs.add(-1, rank, f"rank {rank}: no final state file "
                                    f"({FINAL_FILE.format(rank=rank)}) in dump {side}")
        problem = _names_differ("state snapshots (iterations)", da.states, db.states)
        if problem is not None:
            diffs.add(-1, rank, f"rank {rank}: {problem[0]}")
        for it in sorted(set(da.states) & set(db.states)):
            _compare_snapshot(rank, f"state at iteration {it}", it + 0.5, da.states[it],
                              db.states[it], result, diffs)
        if da.final is not None and db.final is not None:
            _compare_snapshot(rank, "final", math.inf, da.final, db.final, result, diffs)
    if check_iterations and result.ranks and result.iterations == 0:
        diffs.add(-2, -1, "no iteration records to compare")
    if check_state and result.ranks and result.tensors == 0:
        diffs.add(-2, -1, "no state tensors to compare")
    return diffs.into(result)


def _pretty(value):
    if isinstance(value, dict):
        return {k: _pretty(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pretty(v) for v in value]
    if isinstance(value, str):
        try:
            return repr(float.fromhex(value))
        except ValueError:
            return value
    return value
