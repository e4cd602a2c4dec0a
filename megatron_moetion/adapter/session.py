"""The per-rank MoEtion session behind ``megatron_hooks``: it wires the runtime to Megatron.

Per iteration ``t`` (see ``megatron_hooks`` for where Megatron calls each method):

* ``on_train_step_start(t)``: at a window boundary seal the finished window and ship it to
  the buddies (or skip it), promote the shipped window once every buddy acknowledged it
  (dropping logs older than it), open the next window; remember the start-of-iteration RNG
  and router state (an aborted attempt is undone with it);
* the wrapped forward-backward: Megatron's schedule through the logging P2P communicator and
  a recording data iterator, then the agreement (one all-reduce). If ranks lost their state,
  every rank runs the recovery and then iteration ``t`` again; then the optimizer step may run
  once the previous snapshot's copies are done;
* ``on_optimizer_step_end(t)``: the iteration's global scalars go to the logs, and its slot
  is captured (ACTIVE operators' full state, FROZEN operators' compute weights);
* ``on_train_step_end(t)``: counters and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_moetion.adapter import handover
from megatron_moetion.adapter import training_state as ts
from megatron_moetion.adapter.capture import build_captures
from megatron_moetion.adapter.discovery import discover_operators
from megatron_moetion.adapter.failure_detection import FailureDetector
from megatron_moetion.adapter.fault_injection import (
    FIRED_LOG,
    FaultInjector,
    terminate_self,
    wipe_rank_state,
)
from megatron_moetion.adapter.optimizer_probe import OptimizerProbe
from megatron_moetion.adapter.replay import negative_control
from megatron_moetion.adapter.replay_io import (
    FlowControl,
    MoEtionP2PCommunicator,
    RecordingIterator,
    ReplayIterator,
)
from megatron_moetion.adapter.snapshots import SnapshotController
from megatron_moetion.adapter.support import check_supported
from megatron_moetion.agreement import Agreement, agree
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.errors import RecoveryError, UnsupportedConfigurationError
from megatron_moetion.metrics import MetricsWriter
from megatron_moetion.operators import OpKind
from megatron_moetion.recovery_plan import Holdings
from megatron_moetion.replication import Replicator, new_group_for
from megatron_moetion.snapshot import SnapshotEngine, measure_copy_bandwidth
from megatron_moetion.storage import PersistWriter, write_window
from megatron_moetion.testing.faults import FaultPlan
from megatron_moetion.topology import RankInfo, Topology
from megatron_moetion.transport import ProcessGroupTransport
from megatron_moetion.upstream_log import LogStore
from megatron_moetion.window_manager import HostMemoryCap, WindowManager

logger = logging.getLogger(__name__)


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
        joining: set on a warm spare that replaces a dead rank (``adapter.inprocess``): where
            the survivors resume (``adapter.handover``).
    """

    def __init__(self, cfg: MoEtionConfig, model, optimizer, scheduler, args,
                 last_checkpoint_iteration: int | None = None, joining: dict | None = None):
        check_supported(args, cfg)
        self.cfg, self.args = cfg, args
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        self._connect()
        self._bind(model, optimizer, scheduler)
        self.engine = SnapshotEngine(self.device)
        self.replicator = Replicator(self.transport, self.topology.buddies(self.rank),
                                     self.topology.owners(self.rank), self.engine.pool)
        self.persist = PersistWriter(cfg.persist_dir, self.rank) if cfg.persist_dir else None
        self.windows = WindowManager(self.engine, self.replicator, self.persist)
        copy_bandwidth = (cfg.copy_bandwidth_gbps * 1e9 if cfg.copy_bandwidth_gbps
                          else measure_copy_bandwidth(self.device))
        self.snapshots = SnapshotController(cfg, self.bindings, optimizer, self.windows,
                                            copy_bandwidth, self.rank, self._gather)
        self.logs = LogStore(self.device)
        self.host_memory = HostMemoryCap(cfg.host_memory_cap_bytes, self.windows,
                                         self.replicator, self.logs, self.rank)
        self.flow = FlowControl(self.logs, log_boundary=cfg.upstream_logging)
        self.flow.device = self.device
        self.metrics = MetricsWriter(cfg.metrics_file, self.rank)
        # A fault fires once per job: one that fired before a restart (or in the process this
        # one replaces) is not fired again.
        save = getattr(args, "save", None)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.faults = FaultInjector(FaultPlan() if restarted else FaultPlan.parse(cfg.fault_plan),
                                    self.rank, self.world_size,
                                    fired_log=os.path.join(save, FIRED_LOG) if save else "")
        if self.faults.skipped and self.rank == 0:
            logger.warning("[moetion] this job was restarted; %d planned fault(s) of rank 0 "
                           "fired before and are not fired again", self.faults.skipped)
        self.debug_dir = os.environ.get("MOETION_DEBUG_DUMP_DIR", "")  # tests only
        self.agreed = Agreement((), -1, -1, 1)
        self.last_checkpoint_iteration = last_checkpoint_iteration
        self.data_partner_ok = True
        self.lost = False
        self.iteration = 0
        self.first_iteration: int | None = None
        self.recoveries: list[dict] = []
        self._corrupt_next_round = False
        self._num_microbatches = None
        self._start_state = None
        self._resume_at: int | None = None  # survivors of a replaced rank: iteration resumed
        self.recovery_role: str | None = None  # "replaying" or "paused" while recovering
        self._stepped = -1  # the last iteration whose optimizer step ran on this rank
        self._iter: dict = {}
        self._stall = 0.0
        if joining is not None:
            handover.join(self, joining)
        self.detector = FailureDetector(self)
        self.detector.start()
        if joining is None:
            self._report_restart()
            self._restore_checkpoint_rng()
        if self.rank == 0:
            logger.warning("[moetion] on: %d operators on rank 0, %d buddies per rank, copy "
                           "bandwidth %.2f GB/s", len(self.bindings), self.topology.num_buddies,
                           copy_bandwidth / 1e9)

    def _connect(self) -> None:
        """MoEtion's groups and topology: the same collectives, in the same order, on every
        rank, whether it builds its session or a survivor rebinds its own (``rebind``)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection

        timeout = timedelta(seconds=self.cfg.timeout_s)
        self.control_group = dist.new_group(backend="gloo", timeout=timeout)
        # gloo on GPU too: windows and logs live in host memory, and the replication thread
        # must never issue NCCL work concurrently with training's (docs/design.md)
        self.replication_group = new_group_for(timeout_s=self.cfg.timeout_s)
        self.pp_group = mpu.get_pipeline_model_parallel_group()
        self.pg_collection = _build_default_pg_collection()
        info = RankInfo(self.rank, mpu.get_pipeline_model_parallel_rank(), 0,
                        tuple(dist.get_process_group_ranks(self.pp_group)))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (info, _node_id()), group=self.control_group)
        nodes = sorted({n for _, n in gathered}, key=str)
        self.topology = Topology([RankInfo(i.rank, i.stage, nodes.index(n), i.pipeline)
                                  for i, n in gathered], self.cfg.replication_factor)
        if self.topology.capped and self.rank == 0:
            logger.warning("[moetion] --moetion-replication-factor %d capped to %d buddies "
                           "(%d ranks on %d nodes)", self.cfg.replication_factor,
                           self.topology.num_buddies, self.world_size, len(nodes))
        self.transport = ProcessGroupTransport(self.replication_group,
                                               self.cfg.replication_chunk_bytes)

    def _bind(self, model, optimizer, scheduler) -> None:
        """What points into Megatron's model and optimizer objects."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.bindings = discover_operators(model)
        self.router_buffers = [buf for b in self.bindings if b.kind is OpKind.ROUTER
                               for buf in b.buffers]
        self.probe = OptimizerProbe(optimizer)
        self.p2p = None  # built on first use (needs the model config)

    def _gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    # ------------------------------------------------------------------ faults
    def fire(self, phase: str, **kwargs) -> None:
        self.detector.progress(self.iteration, phase)
        for fault in self.faults.due(phase, self.iteration, **kwargs):
            self._carry_out(fault)

    def _carry_out(self, fault) -> None:
        if fault.kind == "lose_state":
            self.lose_state()
        elif fault.kind == "corrupt_replica":
            self._corrupt_next_round = True
        elif fault.kind in ("kill", "hang"):
            terminate_self(fault.kind)

    def _report_restart(self) -> None:
        """On a job restarted from its checkpoint after a failure: report the rollback (the
        last fallback MoEtion recorded, and the planned faults that fired before)."""
        from megatron_moetion.adapter.recovery import fallbacks_recorded

        history = fallbacks_recorded(getattr(self.args, "load", None))
        fired = self.faults.fired_before
        if (history or fired) and self.last_checkpoint_iteration is not None:
            self.metrics.write({"rank": self.rank, "kind": "restart",
                                "checkpoint_iteration": self.last_checkpoint_iteration,
                                "fallbacks_before": len(history),
                                "last_fallback": history[-1] if history else None,
                                "faults_fired_before": fired})

    def lose_state(self) -> None:
        """Carry out a ``lose_state`` fault: this rank forgets everything it held."""
        self.replicator.quiesce(self.cfg.timeout_s)  # no buffer is in flight while dropped
        self.windows.drop_all()
        self.replicator.wipe()
        self.logs.wipe()
        self.snapshots.forget()
        wipe_rank_state(self.model, self.optimizer, self.scheduler, self.bindings)
        self.lost = True

    def _wrap_forward_step(self, forward_step_func):
        """Fire ``fwd`` faults before the first forward micro-batch and ``bwd`` faults when the
        first backward micro-batch reaches this rank."""
        if not any(f.phase in ("fwd", "bwd") and f.iteration == self.iteration
                   for f in self.faults.pending):
            return forward_step_func
        session, state = self, {"first": True}

        def forward_step(*args, **kwargs):
            first, state["first"] = state["first"], False
            if first:
                session.fire("fwd")
            output, loss_func = forward_step_func(*args, **kwargs)
            if first and torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda grad: session.fire("bwd"))
            elif first:
                session.fire("bwd")
            return output, loss_func

        return forward_step

    # ------------------------------------------------------------------ the schedule
    def _communicator(self, kwargs) -> None:
        if kwargs.get("p2p_communicator") is None and kwargs.get("pg_collection") is None:
            if self.p2p is None:
                from megatron.core.utils import get_model_config

                self.p2p = MoEtionP2PCommunicator(self.pp_group, get_model_config(self.model[0]),
                                                  self.flow)
            kwargs["p2p_communicator"], kwargs["pg_collection"] = self.p2p, self.pg_collection
        elif not isinstance(kwargs.get("p2p_communicator"), MoEtionP2PCommunicator):
            raise UnsupportedConfigurationError(
                "--moetion needs Megatron's default pipeline communicator; pretrain() was given "
                "a custom p2p_communicator/pg_collection")

    def wrap_forward_backward_func(self, forward_backward_func):
        session = self

        def moetion_forward_backward(**kwargs):
            if kwargs.get("forward_only", False):
                return forward_backward_func(**kwargs)
            session._communicator(kwargs)
            session._num_microbatches = kwargs["num_microbatches"]
            template = dict(kwargs)
            rerun = False
            while True:
                call = dict(template)
                call["forward_step_func"] = session._wrap_forward_step(
                    template["forward_step_func"])
                session.flow.begin(session.iteration)
                if rerun:
                    call["data_iterator"] = ReplayIterator(
                        session.logs.data_for(session.iteration), session.iteration)
                elif template.get("data_iterator") is not None:
                    call["data_iterator"] = RecordingIterator(template["data_iterator"],
                                                              session.flow)
                session.probe.begin_iteration()
                start = time.perf_counter()
                out = forward_backward_func(**call)
                if not rerun:
                    session.snapshots.fwd_bwd_times.append(time.perf_counter() - start)
                session.fire("step")
                if not session._agree_and_recover(template, forward_backward_func):
                    return out
                rerun = True

        return moetion_forward_backward

    def _agree_and_recover(self, template, forward_backward_func) -> bool:
        """The per-iteration agreement; on failures run the recovery, return True to re-run."""
        t0 = time.perf_counter()
        finished, acked = self.replicator.status()
        self.agreed = agree(self.control_group, self.world_size, self.rank, lost=self.lost,
                            finished_round=finished, acked_window=acked,
                            window_proposal=self.snapshots.proposal())
        self._stall += time.perf_counter() - t0
        if not self.agreed.failed:
            self._stall += self.engine.wait_for_copies()
            return False
        from megatron_moetion.adapter.recovery import recover

        report = recover(self, self.agreed.failed, self.iteration, template,
                         forward_backward_func)
        self.recoveries.append(report)
        self.emit_recovery(report)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return True

    # ------------------------------------------------------------------ recovery support
    def holdings(self) -> Holdings:
        windows = {}
        for w in (self.windows.persisted, self.windows.shipped):
            if w is not None and w.buffer is not None and w.complete:
                windows[w.window_id] = (w.start_iteration, w.window)
        replicas = {}
        for owner, ids in self.replicator.held().items():
            replicas[owner] = {}
            for wid in ids:
                rep = self.replicator.replica(owner, wid)
                replicas[owner][wid] = (rep.start_iteration, rep.window)
        logs = {k: self.logs.coverage(k) for k in ("fwd", "bwd", "data", "record")}
        return Holdings(self.rank, self.lost, windows, replicas, logs, self.data_partner_ok)

    def begin_recovery(self, fault_iteration: int, i_am_failed: bool) -> None:
        self.replicator.quiesce(self.cfg.timeout_s)
        if i_am_failed:  # what it logged of the aborted attempt after losing state is partial
            self.logs.drop_iteration(fault_iteration, ("data",))
        self.lost = False

    def fresh_captures(self):
        return build_captures(self.bindings, self.optimizer)

    @contextlib.contextmanager
    def ddp_without_overlap(self):
        """Frozen parameters never report their gradients ready, so during replay the
        gradient reduction runs synchronously at the end (same buckets, same collectives)."""
        configs = [c.ddp_config for c in self.model if hasattr(c, "ddp_config")]
        saved = [c.overlap_grad_reduce for c in configs]
        for c in configs:
            c.overlap_grad_reduce = False
        try:
            yield
        finally:
            for c, value in zip(configs, saved):
                c.overlap_grad_reduce = value

    def finish_recovery(self, plan, fingerprint) -> None:
        """After the replay: check the survivors, reset the paused ranks, fresh windows."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper


        start = self._start_state
        control = negative_control()
        check = "skip_conversion" not in control or "keep_checks" in control
        if self.rank in plan.replaying and self.rank not in plan.failed and check:
            problems = []
            if fingerprint != ts.state_fingerprint(self.model, self.optimizer):
                problems.append("parameters or optimizer state")
            if not ts.rng_equal(ts.capture_rng(), start["rng"]):
                problems.append("RNG streams")
            now = ts.capture_buffers(self.router_buffers)
            if any(not torch.equal(now[k], v) for k, v in start["buffers"].items()):
                problems.append("router buffers")
            if problems:
                raise RecoveryError(f"replay diverged on surviving rank {self.rank}: its "
                                    f"{', '.join(problems)} differ from before the failure")
        elif self.rank not in plan.replaying:
            ts.restore_rng(start["rng"])
            ts.restore_buffers(self.router_buffers, start["buffers"])
        self.logs.drop_iteration(self.iteration)  # sends of the aborted attempt
        get_moe_metrics_tracker().clear()  # what the replay and the aborted attempt tracked
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        self.windows.discard_current()
        self.snapshots.open_window(self.iteration, self.agreed)

    def emit_recovery(self, report: dict) -> None:
        self.metrics.write({"rank": self.rank, **report})
        if self.rank == 0:
            logger.warning("[moetion] recovery: %s", json.dumps(report, default=str))

    # ------------------------------------------------------------------ per-iteration hooks
    def on_train_step_start(self, iteration: int) -> None:
        t0 = time.perf_counter()
        self._stall, self.iteration = 0.0, iteration
        self._iter = {"iteration": iteration}
        if self.first_iteration is None:
            self.first_iteration = iteration
            self.snapshots.next_window_start = iteration + 1  # the first window needs an
            # agreement (world-wide window size) and the optimizer state of a first step
        self.detector.progress(iteration, "train")
        if self._resume_at == iteration:  # resumed in place: this start ran in the last generation
            self._resume_at = None
            self._stall += time.perf_counter() - t0
            return
        fail_after = []
        if self.snapshots.closes_now(iteration):  # a replication round starts now
            for fault in self.faults.due("replication", iteration, at_or_after=True):
                if fault.kind == "corrupt_replica":
                    self._corrupt_next_round = True
                else:
                    fail_after.append(fault)
        corrupt, self._corrupt_next_round = self._corrupt_next_round, False
        out = self.snapshots.boundary(iteration, self.agreed, corrupt)
        for fault in fail_after:
            self._carry_out(fault)  # while the round runs: its copies may or may not arrive
        if "persisted_start" in out:
            self.logs.truncate(out.pop("persisted_start"))
        self._iter.update(out)
        self._start_state = {"rng": ts.capture_rng(),
                             "buffers": ts.capture_buffers(self.router_buffers),
                             "sched_steps": getattr(self.scheduler, "num_steps", 0),
                             "consumed": int(self.args.consumed_train_samples),
                             "flops": getattr(self.args, "num_floating_point_operations_so_far",
                                              0)}
        self._stall += time.perf_counter() - t0

    def on_optimizer_step_end(self, iteration: int, update_successful: bool, grad_norm) -> None:
        t0 = time.perf_counter()
        self._stepped = iteration
        steps = getattr(self.scheduler, "num_steps", 0)
        record = {"grad_norm": self.probe.last.get("grad_norm"),
                  "found_inf": dict(self.probe.last.get("found_inf", {})),
                  "num_zeros": self.probe.last.get("num_zeros"),
                  "update_successful": update_successful,
                  "num_microbatches": self._num_microbatches,
                  "increment": steps - self._start_state["sched_steps"]}
        self.logs.log_record(iteration, record)
        meta = {"iteration": iteration, "record": record,
                "scheduler": ts.scheduler_state(self.scheduler),
                "param_groups": ts.param_group_state(self.optimizer),
                "grad_scalers": ts.grad_scaler_states(self.optimizer),
                "loss_scale": ts.loss_scale(self.optimizer)}
        self._iter.update(update_successful=update_successful,
                          grad_norm=None if grad_norm is None else float(grad_norm))
        self._iter.update(self.snapshots.capture(iteration, meta))
        if self.debug_dir and self.windows.current is not None:
            self._debug_dump_live(iteration)
        self._stall += time.perf_counter() - t0

    def on_train_step_end(self, iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
        t0 = time.perf_counter()
        self.snapshots.note_end_of_iteration(iteration, int(self.args.consumed_train_samples))
        if iteration == self.first_iteration and not getattr(self, "_partners_checked", False):
            self._partners_checked = True
            self._check_data_partners(iteration)
        self._stall += time.perf_counter() - t0
        self.fire("snapshot")  # the snapshot of this iteration is lost with the rank
        self._emit_metrics(iteration)

    def _check_data_partners(self, iteration: int) -> None:
        """First and last stage of a pipeline must read the same micro-batches: a failed one
        gets its data from the other. Checked once, on the first iteration's digests."""
        digest = zlib.crc32(b"".join(
            t.numpy().tobytes() for item in self.logs.data_for(iteration)
            for _, t in sorted(item.items()) if torch.is_tensor(t))) if \
            self.logs.data_for(iteration) else None
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.control_group)
        partner = self.topology.data_partner(self.rank)
        self.data_partner_ok = partner is not None and digests[partner] == digest
        if partner is not None and not self.data_partner_ok:
            logger.warning("[moetion] rank %d and its pipeline partner %d read different "
                           "micro-batches; a failure of either falls back to the persistent "
                           "checkpoint", self.rank, partner)

    def _emit_metrics(self, iteration: int) -> None:
        rounds = self.replicator.history
        record = dict(self._iter)
        record.update(
            rank=self.rank, stall_ms=self._stall * 1e3,
            fwd_bwd_ms=(self.snapshots.fwd_bwd_times[-1] * 1e3
                        if self.snapshots.fwd_bwd_times else None),
            window_size=self.snapshots.schedule.window if self.snapshots.schedule else None,
            dense_bytes=self.snapshots.dense_bytes(),
            host_bytes_held=self.windows.held_bytes() + self.replicator.held_bytes(),
            log_bytes=self.logs.nbytes(),
            host_memory_cap_bytes=self.host_memory.limit(),
            logs_dropped_iterations=self.logs.dropped_iterations,
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
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is not None:
            for key in ("stall_ms", "snapshot_bytes", "host_bytes_held", "log_bytes"):
                if record.get(key) is not None:
                    writer.add_scalar(f"moetion/{key}", record[key], iteration)

    def on_checkpoint_save(self, iteration: int, non_persistent: bool) -> None:
        if not non_persistent:
            self.last_checkpoint_iteration = iteration
            if getattr(self.args, "save", None):
                ts.save_checkpoint_rng(self.args.save, iteration, self.rank)

    def _restore_checkpoint_rng(self) -> None:
        """After ``--load`` resumed a checkpoint (the session is built once the data iterators
        exist): this rank's own RNG streams of that checkpoint
        (``training_state.save_checkpoint_rng``)."""
        load = getattr(self.args, "load", None)
        if self.last_checkpoint_iteration is not None and load:
            ts.restore_checkpoint_rng(load, self.last_checkpoint_iteration, self.rank)

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.detector.stop()  # a finished rank is not a dead one
        self.snapshots.close()
        self.replicator.close(self.cfg.timeout_s)
        if self.persist is not None:
            self.persist.close(self.cfg.timeout_s)
        if self.debug_dir:
            for owner, ids in self.replicator.held().items():
                for wid in ids:
                    write_window(f"{self.debug_dir}/replicas/held_by{self.rank}", owner,
                                 self.replicator.replica(owner, wid))
        self.probe.uninstall()
        self.metrics.close()

    def _debug_dump_live(self, iteration: int) -> None:
        """Tests only: the live state after this iteration's optimizer step, by name."""
        from megatron_moetion.adapter.optimizer_state import collect_rank_state

        state = {k: v.detach().clone() for k, v in
                 collect_rank_state(self.model, self.optimizer).items()}
        path = f"{self.debug_dir}/live/rank{self.rank}.iter{iteration}.pt"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
