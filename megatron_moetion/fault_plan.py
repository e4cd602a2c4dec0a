"""Deterministic fault plans: which rank fails, at which iteration and phase, and how.

A plan is text, from ``--moetion-fault-plan`` or ``MOETION_FAULT_PLAN``::

    rank=3,iter=12,phase=bwd,kind=lose_state;rank=0,iter=20,phase=step,kind=lose_state

``iter`` is Megatron's 1-based iteration number (the iteration being executed). Phases:

* ``fwd``: before the rank's first forward micro-batch of the iteration;
* ``bwd``: when the rank's first backward micro-batch of the iteration starts;
* ``step``: when the rank enters the optimizer step, before the iteration commits;
* ``snapshot``: while the rank snapshots the iteration, after its optimizer step;
* ``replication``: while the rank replicates a window to its buddies (the first round that
  starts at or after ``iter``);
* ``recovery``: during a recovery that runs at ``iter`` (after the first replayed iteration on
  a replaying rank, while paused on the others).

Kinds: ``lose_state`` wipes the rank's model, optimizer state, snapshots, the replicas it
holds and its logs while its process and process groups stay up; ``corrupt_replica`` flips
bytes in the copy of the window the rank sends to its first buddy (the buddy must detect it);
``kill`` SIGKILLs the rank's process; ``hang`` SIGSTOPs it (it stops answering; the rank that
detects it kills it). After a ``kill`` or ``hang`` a reserve rank takes the dead rank's place
while the survivors keep their state (Megatron's ``--inprocess-restart``, ``adapter.nvrx_restart``),
or, without one, the job restarts from the last persistent checkpoint.

This module is part of the runtime core (the configuration validates plans with it); carrying a
fault out on a live rank is ``adapter.fault_injection``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_moetion.errors import FaultPlanError

PHASES = ("fwd", "bwd", "step", "snapshot", "replication", "recovery")
KINDS = ("lose_state", "corrupt_replica", "kill", "hang")


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault."""

    rank: int
    iteration: int
    phase: str
    kind: str

    def __str__(self) -> str:
        return f"rank={self.rank},iter={self.iteration},phase={self.phase},kind={self.kind}"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """An ordered, immutable list of faults."""

    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Parse a plan; raise ``FaultPlanError`` naming the bad entry and what is allowed."""
        faults = []
        for entry in (e.strip() for e in text.split(";")):
            if not entry:
                continue
            faults.append(_parse_entry(entry))
        return cls(tuple(faults))

    def __bool__(self) -> bool:
        return bool(self.faults)

    def __str__(self) -> str:
        return ";".join(str(f) for f in self.faults)

    def for_rank(self, rank: int) -> list[Fault]:
        return [f for f in self.faults if f.rank == rank]

    def validate_world(self, world_size: int) -> None:
        """Check ranks fit the world; raise ``FaultPlanError`` otherwise."""
        for f in self.faults:
            if not 0 <= f.rank < world_size:
                raise FaultPlanError(
                    f"fault '{f}': rank must be in [0, {world_size - 1}] for a world of "
                    f"{world_size}; got {f.rank}"
                )

    def fail_at(self, rank: int, iteration: int, phase: str = "bwd",
                kind: str = "lose_state") -> FaultPlan:
        """Return a new plan with one more fault (fluent, for tests)."""
        return dataclasses.replace(
            self, faults=self.faults + (_make(rank, iteration, phase, kind, str(rank)),))


def _parse_entry(entry: str) -> Fault:
    fields: dict[str, str] = {}
    for item in entry.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FaultPlanError(
                f"fault plan entry '{entry}': expected comma-separated key=value items "
                f"(rank, iter, phase, kind); got '{item}'"
            )
        if key in fields:
            raise FaultPlanError(f"fault plan entry '{entry}': '{key}' given twice")
        fields[key] = value
    unknown = set(fields) - {"rank", "iter", "phase", "kind"}
    if unknown:
        raise FaultPlanError(
            f"fault plan entry '{entry}': unknown key(s) {sorted(unknown)}; allowed: rank, iter, "
            f"phase, kind"
        )
    for required in ("rank", "iter"):
        if required not in fields:
            raise FaultPlanError(f"fault plan entry '{entry}': '{required}' is required")
    return _make(fields["rank"], fields["iter"], fields.get("phase", "bwd"),
                 fields.get("kind", "lose_state"), entry)


def _make(rank, iteration, phase, kind, entry) -> Fault:
    try:
        rank_i, iter_i = int(rank), int(iteration)
    except ValueError:
        raise FaultPlanError(
            f"fault plan entry '{entry}': rank and iter must be integers; got rank={rank!r}, "
            f"iter={iteration!r}"
        ) from None
    if rank_i < 0:
        raise FaultPlanError(f"fault plan entry '{entry}': rank must be >= 0; got {rank_i}")
    if iter_i < 1:
        raise FaultPlanError(
            f"fault plan entry '{entry}': iter must be >= 1 (Megatron's 1-based iteration); "
            f"got {iter_i}"
        )
    if phase not in PHASES:
        raise FaultPlanError(
            f"fault plan entry '{entry}': phase must be one of {', '.join(PHASES)}; got {phase!r}"
        )
    if kind not in KINDS:
        raise FaultPlanError(
            f"fault plan entry '{entry}': kind must be one of {', '.join(KINDS)}; got {kind!r}"
        )
    if kind == "corrupt_replica" and phase != "replication":
        raise FaultPlanError(
            f"fault plan entry '{entry}': kind=corrupt_replica needs phase=replication"
        )
    return Fault(rank_i, iter_i, phase, kind)
