"""Who is who: pipeline stages, neighbours, buddies and affected slices (pure functions).

The adapter gathers one ``RankInfo`` per rank at set-up (its pipeline stage, its node and the
global ranks of its pipeline, in stage order) and builds a ``Topology``. Everything else here is
arithmetic on that table: the buddy ranks that hold copies of a rank's windows, the slice of
ranks that must replay after a failure (every rank of every failed stage), and the pipeline
neighbours whose upstream logs feed the replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RankInfo:
    """One rank's place in the job.

    Attributes:
        rank: global rank.
        stage: pipeline-parallel rank (0 = first stage).
        node: node index (ranks on one node share a failure domain).
        pipeline: global ranks of this rank's pipeline, in stage order.
    """

    rank: int
    stage: int
    node: int
    pipeline: tuple[int, ...]


class Topology:
    """The rank table plus buddy assignment.

    Args:
        infos: one ``RankInfo`` per rank (any order).
        replication_factor: wanted buddies per rank; capped by what the world allows (see
            ``num_buddies`` and ``capped``).
        ring: interleaved (virtual) pipelines: the pipeline is a ring, the first stage receives
            the activations of its later model chunks from the last stage (and sends it their
            gradients), so every stage has both neighbours.
    """

    def __init__(self, infos: Iterable[RankInfo], replication_factor: int, ring: bool = False):
        self.ring = ring
        self.infos = {i.rank: i for i in infos}
        self.world_size = len(self.infos)
        if sorted(self.infos) != list(range(self.world_size)):
            raise ValueError(f"rank table must cover ranks 0..N-1; got {sorted(self.infos)}")
        self._buddies = assign_buddies([self.infos[r].node for r in range(self.world_size)],
                                       replication_factor)
        self.num_buddies = len(self._buddies[0]) if self._buddies else 0
        self.capped = self.num_buddies < replication_factor
        self._owners: dict[int, list[int]] | None = None  # built on first use

    @property
    def single_stage(self) -> bool:
        """PP = 1: every rank is its pipeline's only stage (no boundaries to localize on)."""
        return all(len(i.pipeline) == 1 for i in self.infos.values())

    def stage_of(self, rank: int) -> int:
        return self.infos[rank].stage

    def prev_rank(self, rank: int) -> int | None:
        """The rank that sends this rank its forward activations (None on the first stage,
        unless the pipeline is a ring)."""
        info = self.infos[rank]
        if info.stage > 0:
            return info.pipeline[info.stage - 1]
        return info.pipeline[-1] if self.ring and len(info.pipeline) > 1 else None

    def next_rank(self, rank: int) -> int | None:
        """The rank that sends this rank its backward gradients (None on the last stage,
        unless the pipeline is a ring)."""
        info = self.infos[rank]
        if info.stage + 1 < len(info.pipeline):
            return info.pipeline[info.stage + 1]
        return info.pipeline[0] if self.ring and len(info.pipeline) > 1 else None

    def data_partner(self, rank: int) -> int | None:
        """The other data-reading end of this rank's pipeline: first and last stages read the
        same micro-batches. None for middle stages and where there is one stage."""
        info = self.infos[rank]
        if len(info.pipeline) < 2:
            return None
        if info.stage == 0:
            return info.pipeline[-1]
        if info.stage == len(info.pipeline) - 1:
            return info.pipeline[0]
        return None

    def buddies(self, rank: int) -> list[int]:
        """Ranks holding copies of ``rank``'s windows, in send order."""
        return list(self._buddies[rank])

    def owners(self, rank: int) -> list[int]:
        """``owners(x)[j]`` is the rank whose ``j``-th buddy is ``x``."""
        if self._owners is None:  # one pass, not a scan of the world per call (docs/scale.md)
            inverse: list[dict[int, int]] = [{} for _ in range(self.num_buddies)]
            for o in range(self.world_size - 1, -1, -1):  # the lowest owner wins, as before
                for j, b in enumerate(self._buddies[o]):
                    inverse[j][b] = o
            self._owners = {r: [inverse[j][r] for j in range(self.num_buddies)]
                            for r in range(self.world_size)}
        return list(self._owners[rank])

    def affected_slice(self, failed: Iterable[int]) -> list[int]:
        """Every rank of every stage that holds a failed rank: they replay together, so the
        data-parallel, expert-parallel and tensor-parallel collectives pair up."""
        stages = {self.stage_of(r) for r in failed}
        return sorted(r for r, i in self.infos.items() if i.stage in stages)


def rack_order(node_racks: dict[str, str]) -> list[str]:
    """Node names in the order their indices take (``RankInfo.node``), so that the next nodes
    of a node, where ``assign_buddies`` puts its buddies, are in other racks: nodes round-robin
    over the racks (each rack's nodes sorted, racks sorted). Without rack names (all "") this
    is the sorted order, as before racks were known."""
    racks: dict[str, list[str]] = {}
    for node in sorted(node_racks, key=str):
        racks.setdefault(node_racks[node], []).append(node)
    if len(racks) <= 1:
        return sorted(node_racks, key=str)
    columns = [racks[k] for k in sorted(racks, key=str)]
    return [col[i] for i in range(max(len(c) for c in columns)) for col in columns
            if i < len(col)]


def assign_buddies(nodes: list[int], replication_factor: int) -> list[list[int]]:
    """Buddies per rank: on other nodes where there are several (the same local index on the
    next nodes, ring-wise), else the next ranks ring-wise. At most one per other node (several
    nodes) or per other rank (one node)."""
    world = len(nodes)
    if world == 0 or replication_factor <= 0:
        return [[] for _ in range(world)]
    node_ids = sorted(set(nodes))
    # one pass over the ranks (a scan per node was quadratic: 1.7 s at 16k ranks, docs/scale.md)
    by_node: dict[int, list[int]] = {n: [] for n in node_ids}
    local_index = [0] * world
    for rank in range(world):
        local_index[rank] = len(by_node[nodes[rank]])
        by_node[nodes[rank]].append(rank)
    position = {n: i for i, n in enumerate(node_ids)}
    equal_nodes = len({len(v) for v in by_node.values()}) == 1
    if len(node_ids) > 1 and equal_nodes:
        r = min(replication_factor, len(node_ids) - 1)
        out = []
        for rank in range(world):
            n, local = position[nodes[rank]], local_index[rank]
            out.append([by_node[node_ids[(n + j) % len(node_ids)]][local] for j in range(1, r + 1)])
        return out
    r = min(replication_factor, world - 1)
    # Ring-wise; with unequal nodes, skip same-node ranks where possible.
    out = []
    for rank in range(world):
        order = [(rank + j) % world for j in range(1, world)]
        other = [x for x in order if nodes[x] != nodes[rank]]
        same = [x for x in order if nodes[x] == nodes[rank]]
        out.append((other + same)[:r])
    if len(node_ids) > 1:
        # with unequal nodes the ring is not symmetric; owners() needs each j-th buddy distinct
        for j in range(r):
            if len({b[j] for b in out}) != world:
                return [[(rank + k) % world for k in range(1, r + 1)] for rank in range(world)]
    return out
