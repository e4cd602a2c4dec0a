"""The per-rank MoEtion session behind ``megatron_hooks``: it wires the runtime to Megatron.

Per iteration ``t`` (see ``megatron_hooks`` for where Megatron calls each method):

* ``on_train_step_start(t)``: close the previous window (seal; ship it to the buddies or skip
  it), promote the shipped window once the agreement says every buddy acknowledged it, and
  open a new window (schedule from Algorithm 1) at a window boundary;
* the wrapped forward-backward: Megatron's schedule, then the agreement (one all-reduce), then
  waiting for the previous snapshot's copies before the optimizer step may run;
* ``on_optimizer_step_end(t)``: capture this iteration's slot (ACTIVE operators' main weights
  and optimizer state, FROZEN operators' compute weights) and the scalars replay needs;
* ``on_train_step_end(t)``: counters and metrics.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_moetion.adapter import training_state as ts
from megatron_moetion.adapter.capture import build_captures
from megatron_moetion.adapter.discovery import discover_operators
from megatron_moetion.adapter.fault_injection import FaultInjector, wipe_rank_state
from megatron_moetion.adapter.optimizer_state import sub_optimizers
from megatron_moetion.adapter.support import check_supported
from megatron_moetion.agreement import Agreement, agree
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.errors import RecoveryError
from megatron_moetion.metrics import MetricsWriter
from megatron_moetion.operators import OpKind, order_operators
from megatron_moetion.replication import Replicator
from megatron_moetion.schedule import (
    PopularityTracker,
    budget_bytes,
    find_window,
    partition_for_window,
)
from megatron_moetion.snapshot import SnapshotEngine, WindowLayout, measure_copy_bandwidth
from megatron_moetion.storage import PersistWriter, write_window
from megatron_moetion.testing.faults import FaultPlan
from megatron_moetion.topology import RankInfo, Topology
from megatron_moetion.transport import ProcessGroupTransport
from megatron_moetion.window_manager import WindowManager

logger = logging.getLogger(__name__)


def _log0(msg: str, *args) -> None:
    if dist.get_rank() == 0:
        logger.warning("[moetion] " + msg, *args)


def _node_id() -> str:
    return os.environ.get("MOETION_NODE_ID") or os.environ.get("GROUP_RANK") or socket.gethostname()


class MoEtionSession:
    """Everything MoEtion keeps on one rank (see module docstring).

    Args:
        cfg: the validated configuration.
        model: Megatron's list of (DDP-wrapped) model chunks.
        optimizer: Megatron's (chained) optimizer.
        scheduler: Megatron's ``OptimizerParamScheduler``.
        args: Megatron's parsed arguments.
        last_checkpoint_iteration: iteration of the checkpoint ``--load`` restored, if any.
    """

    def __init__(self, cfg: MoEtionConfig, model, optimizer, scheduler, args,
                 last_checkpoint_iteration: int | None = None):
        from megatron.core import parallel_state as mpu

        check_supported(args, cfg)
        self.cfg, self.model, self.optimizer, self.scheduler, self.args = (
            cfg, model, optimizer, scheduler, args)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        timeout = timedelta(seconds=cfg.timeout_s)
        # MoEtion's own groups, created in the same order on every rank.
        self.control_group = dist.new_group(backend="gloo", timeout=timeout)
        repl_backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.replication_group = dist.new_group(backend=repl_backend, timeout=timeout)
        pp_group = mpu.get_pipeline_model_parallel_group()
        info = RankInfo(self.rank, mpu.get_pipeline_model_parallel_rank(), 0,
                        tuple(dist.get_process_group_ranks(pp_group)))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (info, _node_id()), group=self.control_group)
        nodes = sorted({n for _, n in gathered}, key=str)
        infos = [RankInfo(i.rank, i.stage, nodes.index(n), i.pipeline) for i, n in gathered]
        self.topology = Topology(infos, cfg.replication_factor)
        if self.topology.capped:
            _log0("--moetion-replication-factor %d capped to %d buddies (world of %d ranks on "
                  "%d nodes)", cfg.replication_factor, self.topology.num_buddies,
                  self.world_size, len(nodes))
        self.bindings = discover_operators(model)
        self.routers = [b for b in self.bindings if b.kind is OpKind.ROUTER]
        self.engine = SnapshotEngine(self.device)
        stage_device = self.device if repl_backend == "nccl" else None
        self.transport = ProcessGroupTransport(self.replication_group,
                                               cfg.replication_chunk_bytes, stage_device)
        self.replicator = Replicator(self.transport, self.topology.buddies(self.rank),
                                     self.topology.owners(self.rank), self.engine.pool)
        self.persist = PersistWriter(cfg.persist_dir, self.rank) if cfg.persist_dir else None
        self.windows = WindowManager(self.engine, self.replicator, self.persist)
        self.metrics = MetricsWriter(cfg.metrics_file, self.rank)
        self.popularity = PopularityTracker(cfg.popularity_window_iters, cfg.reorder_threshold,
                                            cfg.reorder_fraction)
        self._router_counts: dict[str, torch.Tensor] = {}
        self._hooks = [self._count_tokens(b) for b in self.routers]
        self.copy_bandwidth = (cfg.copy_bandwidth_gbps * 1e9 if cfg.copy_bandwidth_gbps
                               else measure_copy_bandwidth(self.device))
        self.fwd_bwd_times: deque[float] = deque(maxlen=50)
        self.agreed = Agreement((), -1, -1, 1)
        self.captures = None
        self.schedule = None
        self.order: list[str] = []
        self.first_iteration: int | None = None
        self.next_window_start: int | None = None
        self.last_checkpoint_iteration = last_checkpoint_iteration
        self.faults = FaultInjector(FaultPlan.parse(cfg.fault_plan), self.rank, self.world_size)
        self.debug_dir = os.environ.get("MOETION_DEBUG_DUMP_DIR", "")  # tests only
        self._lost = False
        self._corrupt_next_round = False
        self._stall = 0.0
        self._iter = {}
        self.iteration = 0
        _log0("on: %d operators on rank 0, %d buddies per rank, copy bandwidth %.2f GB/s",
              len(self.bindings), self.topology.num_buddies, self.copy_bandwidth / 1e9)

    # ------------------------------------------------------------------ popularity
    def _count_tokens(self, binding):
        router = binding.modules[0]
        layer = binding.layer
        local = None

        def hook(module, inputs, output):
            nonlocal local
            if not module.training or not torch.is_grad_enabled():
                return
            routing_map = output[1]
            counts = routing_map.sum(dim=0).to(torch.float64)
            key = f"layer{layer}"
            prev = self._router_counts.get(key)
            self._router_counts[key] = counts if prev is None else prev + counts

        return router.register_forward_hook(hook)

    def _expert_popularity(self) -> dict[str, float]:
        """Token counts of this rank's experts over the recent rolling window."""
        counts = {}
        for key, tensor in self._router_counts.items():
            for eid, c in enumerate(tensor.tolist()):
                counts[f"{key}.expert{eid}"] = c
        self._router_counts.clear()
        mine = {b.name for b in self.bindings if b.kind is OpKind.EXPERT}
        self.popularity.add({k: v for k, v in counts.items() if k in mine})
        return self.popularity.totals()

    # ------------------------------------------------------------------ scheduling
    def _specs(self):
        return {c.name: c.spec() for c in self.captures}

    def _window_proposal(self) -> int:
        """The window size this rank would like for its next window (Algorithm 1)."""
        if self.cfg.window:
            return self.cfg.window
        if self.captures is None or not self.fwd_bwd_times:
            return 1
        specs = self._specs()
        ordered = [specs[n] for n in self.order] if self.order else order_operators(specs.values())
        fwd_bwd = self.cfg.iter_time_s or statistics.median(self.fwd_bwd_times)
        schedule = find_window(ordered, budget_bytes(self.copy_bandwidth, fwd_bwd))
        if not schedule.fits:
            logger.warning("[moetion] rank %d: even one operator per slot does not fit the "
                           "copy budget (%.1f MB in %.3f s); W=%d, snapshots will stall",
                           self.rank, budget_bytes(self.copy_bandwidth, fwd_bwd) / 1e6, fwd_bwd,
                           schedule.window)
        return schedule.window

    def _open_window(self, iteration: int) -> None:
        self.captures = build_captures(self.bindings, self.optimizer)
        specs = self._specs()
        reorder = not self.order or self.popularity.should_reorder()
        if reorder:
            popularity = self._expert_popularity()
            self.order = [op.name for op in order_operators(specs.values(), popularity)]
        else:
            self._expert_popularity()
        window = max(1, self.agreed.window_proposal if not self.cfg.window else self.cfg.window)
        fwd_bwd = self.cfg.iter_time_s or (statistics.median(self.fwd_bwd_times)
                                           if self.fwd_bwd_times else 0.0)
        self.schedule = partition_for_window([specs[n] for n in self.order], window,
                                             budget_bytes(self.copy_bandwidth, fwd_bwd))
        by_name = {c.name: c for c in self.captures}
        slot_items = []
        for k in range(window):
            items = [item for name in self.schedule.active(k) for item, _ in by_name[name].active]
            items += [item for name in self.schedule.frozen(k) for item, _ in by_name[name].frozen]
            slot_items.append(items)
        self._slot_items = slot_items
        layout = WindowLayout.build(slot_items)
        self.windows.open(iteration, layout, {"slots": self.schedule.slots,
                                              "slot_bytes": self.schedule.slot_bytes,
                                              "reordered": reorder})
        self.next_window_start = iteration + window

    # ------------------------------------------------------------------ hooks
    def wrap_forward_backward_func(self, forward_backward_func):
        session = self

        def moetion_forward_backward(**kwargs):
            if kwargs.get("forward_only", False):
                return forward_backward_func(**kwargs)
            kwargs["forward_step_func"] = session._wrap_forward_step(kwargs["forward_step_func"])
            start = time.perf_counter()
            out = forward_backward_func(**kwargs)
            session.fwd_bwd_times.append(time.perf_counter() - start)
            session._fire("step")
            session._after_forward_backward()
            return out

        return moetion_forward_backward

    def _wrap_forward_step(self, forward_step_func):
        """Fire ``fwd`` faults before the first forward micro-batch and ``bwd`` faults when the
        first backward micro-batch reaches this rank."""
        if not any(f.phase in ("fwd", "bwd") for f in self.faults.pending):
            return forward_step_func
        session, state = self, {"first": True}

        def forward_step(*args, **kwargs):
            first, state["first"] = state["first"], False
            if first:
                session._fire("fwd")
            output, loss_func = forward_step_func(*args, **kwargs)
            if first and torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda grad: session._fire("bwd") or None)
            elif first:
                session._fire("bwd")
            return output, loss_func

        return forward_step

    def _fire(self, phase: str, **kwargs) -> None:
        for fault in self.faults.due(phase, self.iteration, **kwargs):
            if fault.kind == "lose_state":
                self.lose_state()
            elif fault.kind == "corrupt_replica":
                self._corrupt_next_round = True

    def lose_state(self) -> None:
        """Carry out a ``lose_state`` fault: this rank forgets everything it held."""
        self.replicator.quiesce(self.cfg.timeout_s)  # no buffer is in flight while dropped
        self.windows.drop_all()
        self.replicator.wipe()
        wipe_rank_state(self.model, self.optimizer, self.scheduler, self.bindings)
        self.captures, self.order = None, []
        self._lost = True

    def _after_forward_backward(self) -> None:
        t0 = time.perf_counter()
        finished, acked = self.replicator.status()
        self.agreed = agree(self.control_group, self.world_size, self.rank, lost=self._lost,
                            finished_round=finished, acked_window=acked,
                            window_proposal=self._window_proposal())
        self._stall += self.engine.wait_for_copies() + (time.perf_counter() - t0)
        if self.agreed.failed:
            raise RecoveryError(
                f"ranks {list(self.agreed.failed)} lost their state at iteration "
                f"{self.iteration}; localized recovery is not available in this build")

    def on_train_step_start(self, iteration: int) -> None:
        t0 = time.perf_counter()
        self._stall = 0.0
        self.iteration = iteration
        if self.first_iteration is None:
            self.first_iteration = iteration
            self.next_window_start = iteration + 1  # the first window needs an agreement
        self._iter = {"iteration": iteration}
        current = self.windows.current
        if current is not None and current.complete:
            last = current.window - 1
            rng_now = ts.capture_rng()
            if not ts.rng_equal(rng_now, current.slot_meta[last]["rng_after"]):
                current.slot_meta[last]["rng_after"] = rng_now  # consumed between iterations
            self._fire("replication", at_or_after=True)
            corrupt, self._corrupt_next_round = self._corrupt_next_round, False
            self._iter["window_closed"] = self.windows.close_current(self.agreed, corrupt)
        promoted = self.windows.advance(self.agreed)
        if promoted is not None:
            self._iter["persisted_window"] = promoted.window_id
        if iteration >= self.next_window_start:
            self._open_window(iteration)
        self._stall += time.perf_counter() - t0

    def on_optimizer_step_end(self, iteration: int, update_successful: bool, grad_norm) -> None:
        t0 = time.perf_counter()
        window = self.windows.current
        meta = {
            "iteration": iteration,
            "update_successful": update_successful,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "loss_scale": ts.loss_scale(self.optimizer),
            "scheduler": ts.scheduler_state(self.scheduler),
            "hparams": ts.param_group_hparams(self.optimizer),
            "grad_scalers": ts.grad_scaler_states(self.optimizer),
        }
        self._iter.update(update_successful=update_successful, grad_norm=meta["grad_norm"])
        if window is not None:
            slot = iteration - window.start_iteration
            nbytes = self.engine.capture(window, slot, self._slot_items[slot], meta)
            if self.debug_dir:
                self._debug_dump_live(iteration)
            self._iter.update(window=window.window_id, slot=slot, snapshot_bytes=nbytes,
                              copy_s=self.engine.last_copy_s,
                              active_bytes=sum(i.source.numel() * i.source.element_size()
                                               for i in self._slot_items[slot]
                                               if i.mode == "active"),
                              frozen_bytes=sum(i.source.numel() * i.source.element_size()
                                               for i in self._slot_items[slot]
                                               if i.mode == "frozen"))
        self._stall += time.perf_counter() - t0

    def on_train_step_end(self, iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
        t0 = time.perf_counter()
        window = self.windows.current
        if window is not None and (iteration - window.start_iteration) in window.slot_meta:
            slot_meta = window.slot_meta[iteration - window.start_iteration]
            slot_meta["consumed_samples"] = int(self.args.consumed_train_samples)
            slot_meta["rng_after"] = ts.capture_rng()
        self._stall += time.perf_counter() - t0
        self._fire("snapshot")  # the snapshot of this iteration is lost with the rank
        self._emit_metrics(iteration)

    def _emit_metrics(self, iteration: int) -> None:
        rounds = self.replicator.history
        record = dict(self._iter)
        record.update(
            rank=self.rank, stall_ms=self._stall * 1e3,
            fwd_bwd_ms=(self.fwd_bwd_times[-1] * 1e3 if self.fwd_bwd_times else None),
            window_size=self.schedule.window if self.schedule else None,
            dense_bytes=(sum(s.active_bytes for s in self._specs().values())
                         if self.captures else None),
            host_bytes_held=self.windows.held_bytes() + self.replicator.held_bytes(),
            replication_bytes=self.transport.bytes_sent,
            replication_rounds=len(rounds),
            replication_failures=self.replicator.failures,
            corrupt_copies_detected=self.replicator.corrupt_detected,
            host_allocations=self.engine.pool.allocations,
            replication_last_s=rounds[-1].seconds if rounds else None,
            windows_skipped=self.windows.skipped,
            persisted_window=(self.windows.persisted.window_id
                              if self.windows.persisted is not None else None),
        )
        self.metrics.write(record)
        self._tensorboard(iteration, record)

    def _tensorboard(self, iteration: int, record: dict) -> None:
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is None:
            return
        for key in ("stall_ms", "snapshot_bytes", "host_bytes_held", "replication_bytes"):
            if record.get(key) is not None:
                writer.add_scalar(f"moetion/{key}", record[key], iteration)

    def on_checkpoint_save(self, iteration: int, non_persistent: bool) -> None:
        if not non_persistent:
            self.last_checkpoint_iteration = iteration

    def shutdown(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self.replicator.close(self.cfg.timeout_s)
        if self.debug_dir:
            for owner, ids in self.replicator.held().items():
                for wid in ids:
                    write_window(f"{self.debug_dir}/replicas/held_by{self.rank}", owner,
                                 self.replicator.replica(owner, wid))
        if self.persist is not None:
            self.persist.close(self.cfg.timeout_s)
        self.metrics.close()

    def _debug_dump_live(self, iteration: int) -> None:
        """Tests only: the live state after this iteration's optimizer step, by name."""
        from megatron_moetion.adapter.optimizer_state import collect_rank_state

        path = f"{self.debug_dir}/live/rank{self.rank}.iter{iteration}.pt"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        from megatron.core.utils import unwrap_model

        state = {k: v.detach().clone() for k, v in
                 collect_rank_state(self.model, self.optimizer).items()}
        for c, chunk in enumerate(unwrap_model(list(self.model))):
            for name, b in chunk.named_buffers():
                state[f"buffer/chunk{c}.{name}"] = b.detach().clone()
        torch.save(state, path)

    # ------------------------------------------------------------------ for tests and demos
    def describe(self) -> dict:
        return {
            "rank": self.rank, "operators": [b.name for b in self.bindings],
            "buddies": self.topology.buddies(self.rank),
            "sub_optimizers": [type(s).__name__ for s in sub_optimizers(self.optimizer)],
        }
