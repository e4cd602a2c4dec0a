"""The bitwise determinism oracle: dump everything a run's ranks hold and compare two dumps exactly.

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

``compare_dumps`` compares every rank's records and states bit for bit and reports every
difference, named by rank, snapshot (``iteration T``, ``state at iteration T`` or ``final``)
and field; structural problems (no state at all, a missing rank, a rank without a state file,
different record or snapshot counts, different field sets) make the verdict DIFFERENT too,
never "identical".
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_ITER_FILE = "rank{rank}.iterations.jsonl"
_FINAL_FILE = "rank{rank}.state.pt"
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
        name = (_FINAL_FILE.format(rank=self.rank) if iteration is None
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
                                    f"({_FINAL_FILE.format(rank=rank)}) in dump {side}")
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
