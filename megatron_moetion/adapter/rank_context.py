"""A rank's place in the job for one generation: its process groups, topology and transport.

``RankContext.connect`` runs the same collectives in the same order on every rank, whether a
rank builds its first session or a survivor of an in-place replacement connects again in the
next generation (every generation has its own process groups). The context is never patched:
a new generation gets a new context, and each component takes it in ``rebind``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_moetion.replication import new_group_for
from megatron_moetion.topology import RankInfo, Topology, rack_order
from megatron_moetion.transport import ProcessGroupTransport

logger = logging.getLogger(__name__)


def node_id(template: str, rank: int) -> str:
    """The node this rank runs on, for buddy placement: ``--moetion-node-id`` (``{rank}``
    filled in; tests simulate several nodes on one host), torchrun's ``GROUP_RANK``, or the
    host name."""
    if template:
        return template.replace("{rank}", str(rank))
    return os.environ.get("GROUP_RANK") or socket.gethostname()


@dataclass
class RankContext:
    """See the module docstring."""

    rank: int
    world_size: int
    device: torch.device
    control_group: object
    replication_group: object
    pp_group: object
    pg_collection: object
    topology: Topology
    transport: ProcessGroupTransport

    @classmethod
    def connect(cls, cfg, device: torch.device | None = None) -> RankContext:
        """Build MoEtion's groups and the job's topology (collective: every rank calls it)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection

        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.cuda.is_available() else torch.device("cpu"))
        control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.timeout_s))
        # gloo on GPU too: windows and logs live in host memory, and the replication thread
        # must never issue NCCL work concurrently with training's (docs/design.md)
        replication_group = new_group_for(timeout_s=cfg.timeout_s)
        pp_group = mpu.get_pipeline_model_parallel_group()
        pg_collection = _build_default_pg_collection()
        info = RankInfo(rank, mpu.get_pipeline_model_parallel_rank(), 0,
                        tuple(dist.get_process_group_ranks(pp_group)))
        gathered = [None] * world_size
        rack = cfg.rack_id.replace("{rank}", str(rank))
        dist.all_gather_object(gathered, (info, node_id(cfg.node_id, rank), rack),
                               group=control_group)
        node_racks: dict[str, str] = {}
        for _, n, k in gathered:  # a node's ranks should agree; the lowest rank's name wins
            node_racks.setdefault(n, k)
        nodes = rack_order(node_racks)
        position = {n: i for i, n in enumerate(nodes)}
        topology = Topology([RankInfo(i.rank, i.stage, position[n], i.pipeline)
                             for i, n, _ in gathered], cfg.replication_factor,
                            ring=bool(mpu.get_virtual_pipeline_model_parallel_world_size()))
        if topology.capped and rank == 0:
            logger.warning("[moetion] --moetion-replication-factor %d capped to %d buddies "
                           "(%d ranks on %d nodes)", cfg.replication_factor,
                           topology.num_buddies, world_size, len(nodes))
        transport = ProcessGroupTransport(replication_group, cfg.replication_chunk_bytes)
        return cls(rank, world_size, device, control_group, replication_group, pp_group,
                   pg_collection, topology, transport)

    def gather(self, obj) -> list:
        """``all_gather_object`` over every rank, on MoEtion's control group."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.control_group)
