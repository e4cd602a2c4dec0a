"""Warm spares and generations: a spare process takes a dead rank's place, survivors keep theirs.

The job starts ``W + S`` processes: ids ``0..W-1`` are ranks ``0..W-1`` of generation 0, ids
``W..W+S-1`` are warm spares that wait (imports done) for an assignment. Every generation's
process groups rendezvous under their own prefix of one store that outlives every worker (the
launcher hosts it, as torchrun's agent hosts its rendezvous store), so a new generation never
meets the keys of a dead one.

After a failure of generation ``g`` (the liveness verdict names the dead ranks), each survivor
publishes its hand-off (where its training state stands) and reads one decision, taken by the
lowest surviving rank: each dead rank gets the next free spare, which is told its rank and where
to resume; or, when the survivors disagree on where they stand or no spare is left, every rank
falls back to the persistent checkpoint. Everyone then joins generation ``g + 1`` with the same
world size and rank order.

Environment (set by the launcher): ``MOETION_PROCESS_ID``, ``MOETION_ACTIVE_WORLD_SIZE``,
``MOETION_SPARES``, and ``MASTER_ADDR``/``MASTER_PORT`` naming the store (workers connect to it
as clients). ``shut_down_peer_connections`` is gloo's missing abort. Logic over a store with
``set/get/add/check``; no Megatron.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

PREFIX = "moetion/job"
ENV_PROCESS_ID = "MOETION_PROCESS_ID"
ENV_ACTIVE = "MOETION_ACTIVE_WORLD_SIZE"
ENV_SPARES = "MOETION_SPARES"


@dataclass
class Decision:
    """What every rank does after a failure of generation ``generation - 1``."""

    generation: int
    dead: list[int]
    replaced_by: dict[int, int] = field(default_factory=dict)  # dead rank -> spare process id
    resume: dict = field(default_factory=dict)  # where training resumes (from the survivors)
    fallback: str = ""  # non-empty: no in-place replacement, and why

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation, "dead": self.dead,
                           "replaced_by": {str(k): v for k, v in self.replaced_by.items()},
                           "resume": self.resume, "fallback": self.fallback})

    @classmethod
    def from_json(cls, text: str) -> Decision:
        d = json.loads(text)
        return cls(d["generation"], d["dead"], {int(k): v for k, v in d["replaced_by"].items()},
                   d["resume"], d["fallback"])


@dataclass
class Assignment:
    """A spare's orders: join ``generation`` as ``rank`` and resume as ``resume`` says."""

    generation: int
    rank: int
    resume: dict


def _decode(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Membership:
    """This process's view of the job's ranks and spares (see module docstring)."""

    def __init__(self, store, process_id: int, active_world_size: int, spares: int, *,
                 poll_s: float = 0.05):
        if active_world_size < 1 or spares < 0 or not 0 <= process_id < active_world_size + spares:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, "
                             f"{ENV_ACTIVE} + {ENV_SPARES}) = [0, {active_world_size + spares})")
        self.store, self.process_id = store, process_id
        self.world_size, self.spares, self.poll_s = active_world_size, spares, poll_s

    @property
    def is_spare(self) -> bool:
        return self.process_id >= self.world_size

    def _key(self, *parts) -> str:
        return "/".join((PREFIX,) + tuple(str(p) for p in parts))

    def _wait_key(self, key: str, timeout_s: float | None, give_up_key: str | None = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.store.check([key]):
                return _decode(self.store.get(key))
            if give_up_key is not None and self.store.check([give_up_key]):
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no {key} within {timeout_s:.0f} s")
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------ spares
    def wait_for_assignment(self, timeout_s: float | None = None) -> Assignment | None:
        """A spare blocks here until it replaces a rank, or until the job is done (None)."""
        text = self._wait_key(self._key("assign", self.process_id), timeout_s,
                              give_up_key=self._key("done"))
        if text is None:
            return None
        d = json.loads(text)
        return Assignment(d["generation"], d["rank"], d["resume"])

    def finish(self) -> None:
        """Training ended: idle spares may exit."""
        self.store.set(self._key("done"), "1")

    # ------------------------------------------------------------------ survivors
    def hand_off(self, generation: int, rank: int, state: dict) -> None:
        """Publish where this survivor's training state stands after generation's failure."""
        self.store.set(self._key("gen", generation, "handoff", rank), json.dumps(state))

    def decide(self, generation: int, rank: int, dead: list[int],
               timeout_s: float) -> Decision:
        """The decision after generation ``generation`` failed; the lowest survivor takes it
        (from every survivor's hand-off), the others read it."""
        survivors = [r for r in range(self.world_size) if r not in dead]
        key = self._key("gen", generation, "decision")
        if rank == survivors[0]:
            states = {r: json.loads(self._wait_key(
                self._key("gen", generation, "handoff", r), timeout_s)) for r in survivors}
            decision = self._decide(generation, sorted(dead), states)
            for dead_rank, spare in decision.replaced_by.items():
                self.store.set(self._key("assign", spare), json.dumps(
                    {"generation": decision.generation, "rank": dead_rank,
                     "resume": decision.resume}))
            self.store.set(key, decision.to_json())
            return decision
        return Decision.from_json(self._wait_key(key, timeout_s))

    def _decide(self, generation: int, dead: list[int], states: dict[int, dict]) -> Decision:
        decision = Decision(generation + 1, dead)
        if any(s.get("resume") is None for s in states.values()):
            decision.fallback = "a survivor has no training state to keep (it failed in set-up)"
        else:
            decision.fallback = survivor_conflict({r: s["resume"] for r, s in states.items()})
        if decision.fallback:
            return decision
        decision.resume = next(iter(states.values()))["resume"]
        for dead_rank in dead:
            taken = int(self.store.add(self._key("spares_taken"), 1)) - 1
            if taken >= self.spares:
                decision.replaced_by.clear()
                decision.fallback = (f"no warm spare left for rank {dead_rank} "
                                     f"({self.spares} started, all taken)")
                return decision
            decision.replaced_by[dead_rank] = self.world_size + taken
        return decision


def survivor_conflict(kept: dict[int, dict]) -> str:
    """Why the survivors cannot all resume in place from where they stand (``kept``: rank ->
    what it published), or "" when they can: one interrupted inside or after an optimizer step,
    or they stopped at different points. Both in-place engines decide with it."""
    inside = sorted(r for r, k in kept.items() if k.get("in_step"))
    if inside:
        return (f"ranks {inside} were inside an optimizer step the failure interrupted "
                f"(their state may be partly stepped)")
    after = sorted(r for r, k in kept.items() if k.get("after_step"))
    if after:
        return (f"ranks {after} stopped after an optimizer step the failure interrupted; "
                f"in place, training resumes only from the start of an iteration")
    if len({json.dumps(k, sort_keys=True) for k in kept.values()}) != 1:
        where = {r: k.get("iteration") for r, k in sorted(kept.items())}
        return (f"the survivors stopped at different points of training (resume iteration "
                f"by rank: {where})")
    return ""


def membership_from_env(connect) -> Membership | None:
    """The job's ``Membership`` when the launcher started warm spares, else None.

    ``connect()`` returns a client of the job's store (called only in replacement mode)."""
    if ENV_PROCESS_ID not in os.environ:
        return None
    try:
        process_id = int(os.environ[ENV_PROCESS_ID])
        active = int(os.environ[ENV_ACTIVE])
        spares = int(os.environ.get(ENV_SPARES, "0"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{ENV_PROCESS_ID}, {ENV_ACTIVE} and {ENV_SPARES} must be integers "
                         f"({exc})") from exc
    return Membership(connect(), process_id, active, spares)


def shut_down_peer_connections(*store_ports: int) -> int:
    """Shut down this process's connections to its peers (every connected TCP socket but
    those of the stores on ``store_ports``, client or server side). A gloo operation still pending on a failed generation's group keeps that
    group, and so its sockets, alive, and a survivor blocked on this rank would wait for its
    timeout; gloo has no abort (NCCL has ``ncclCommAbort``). Shutting the connections down
    makes every such operation fail at once, here and on the peers. Returns how many."""
    count = 0
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir) if os.path.isdir(fd_dir) else ():
        try:
            if not os.readlink(os.path.join(fd_dir, name)).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                      socket.AF_INET6):
                continue
            # a client of a store, or (on the rank that hosts one) a store's own connection
            if sock.getpeername()[1] in store_ports or sock.getsockname()[1] in store_ports:
                continue
            sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:
            pass  # listening or already closed
        finally:
            sock.close()  # the duplicate only
    return count
