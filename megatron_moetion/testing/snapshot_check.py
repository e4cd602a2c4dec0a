"""Check persisted windows against the live state dumped at each iteration (tests only).

A run with ``--moetion-persist-dir P`` and ``--moetion-debug-dump-dir D`` leaves every persisted
window in ``P``, the live state after every optimizer step in ``D/live`` and, at shutdown, every
replica a rank holds in ``D/replicas/held_by{B}``. ``check_run`` verifies that:

* every operator is ACTIVE in exactly one slot of each window, FROZEN in the slots before it
  and absent after it;
* every captured item equals, bit for bit, the live tensor region at its capture iteration
  (main weights, optimizer state, compute weights, buffers);
* every replica a buddy holds is byte-identical to its owner's window of the same id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_moetion.storage import read_window

_KEY = re.compile(r"^(?P<name>.+)\[(?P<a>\d+):(?P<b>\d+)\]/(?P<field>[^/]+)$")
_LIVE = re.compile(r"^optim\d+/(?P<name>.+)\[(?P<s>\d+):(?P<e>\d+)\]/(?P<field>[^/]+)$")


@dataclass
class CheckReport:
    windows: int = 0
    items: int = 0
    bytes: int = 0
    replicas: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.windows > 0


def _live_index(live: dict[str, torch.Tensor]):
    """(name, field) -> list of (start, end, tensor) for optimizer entries."""
    index: dict[tuple[str, str], list] = {}
    for key, value in live.items():
        m = _LIVE.match(key)
        if m:
            index.setdefault((m["name"], m["field"]), []).append(
                (int(m["s"]), int(m["e"]), value.reshape(-1)))
    return index


def _expected(key: str, live: dict[str, torch.Tensor], index) -> torch.Tensor | None:
    if key.startswith("buffer/"):
        t = live.get(key)
        return None if t is None else t.reshape(-1)
    m = _KEY.match(key)
    if m is None:
        return None
    name, a, b, fld = m["name"], int(m["a"]), int(m["b"]), m["field"]
    if fld == "weight":
        return live[f"param/{name}"].reshape(-1)[a:b]
    entries = index.get((name, fld), [])
    if fld == "main" and not entries:  # fp32: the main copy is the parameter itself
        return live[f"param/{name}"].reshape(-1)[a:b]
    for s, e, t in entries:
        if s <= a and b <= e:
            return t if t.numel() == 1 else t[a - s:b - s]
    return None


def check_run(persist_dir: str | Path, debug_dir: str | Path) -> CheckReport:
    report = CheckReport()
    live_cache: dict[tuple[int, int], dict] = {}
    owners: dict[tuple[int, int], bytes] = {}
    for path in sorted(Path(persist_dir).glob("rank*.window*.moetion")):
        rank = int(re.match(r"rank(\d+)\.", path.name).group(1))
        window = read_window(path)
        report.windows += 1
        owners[(rank, window.window_id)] = bytes(
            window.buffer[:window.layout.total_bytes].numpy())
        ops_active: dict[str, list[int]] = {}
        ops_frozen: dict[str, set[int]] = {}
        for slot, specs in enumerate(window.layout.slots):
            for spec in specs:
                if spec.mode == "active":
                    ops_active.setdefault(spec.op, []).append(slot)
                else:
                    ops_frozen.setdefault(spec.op, set()).add(slot)
        for op, slots in ops_active.items():
            if len(set(slots)) != 1:
                report.problems.append(f"rank {rank} window {window.window_id}: {op} ACTIVE in "
                                       f"slots {sorted(set(slots))}")
                continue
            active_slot = slots[0]
            frozen = ops_frozen.get(op, set())
            if frozen != set(range(active_slot)):
                report.problems.append(f"rank {rank} window {window.window_id}: {op} ACTIVE in "
                                       f"slot {active_slot} but FROZEN in {sorted(frozen)}")
        missing = set(ops_frozen) - set(ops_active)
        if missing:
            report.problems.append(f"rank {rank} window {window.window_id}: never ACTIVE: "
                                   f"{sorted(missing)[:3]}")
        for slot, specs in enumerate(window.layout.slots):
            iteration = window.iteration_of(slot)
            key = (rank, iteration)
            if key not in live_cache:
                live_path = Path(debug_dir) / "live" / f"rank{rank}.iter{iteration}.pt"
                live_cache[key] = torch.load(live_path, weights_only=True, map_location="cpu")
            live = live_cache[key]
            index = _live_index(live)
            for spec in specs:
                got = window.view(spec)
                want = _expected(spec.key, live, index)
                report.items += 1
                report.bytes += spec.nbytes
                if want is None:
                    report.problems.append(f"rank {rank} iteration {iteration}: no live tensor "
                                           f"for {spec.key}")
                elif want.dtype != got.dtype or not torch.equal(
                        want.contiguous().view(torch.uint8), got.view(torch.uint8)):
                    report.problems.append(f"rank {rank} iteration {iteration}: {spec.key} "
                                           f"differs from the live state")
    for path in sorted(Path(debug_dir).glob("replicas/held_by*/rank*.window*.moetion")):
        owner = int(re.match(r"rank(\d+)\.", path.name).group(1))
        replica = read_window(path)
        mine = owners.get((owner, replica.window_id))
        if mine is None:
            continue  # the owner's copy was not persisted (e.g. still in flight at the end)
        report.replicas += 1
        if bytes(replica.buffer[:replica.layout.total_bytes].numpy()) != mine:
            report.problems.append(f"{path.parent.name} holds a copy of rank {owner}'s window "
                                   f"{replica.window_id} that differs from the owner's")
    return report
