"""The per-rank MoEtion session: its components, wired to Megatron's training loop.

A session owns its components, each with its own state, taking what it needs explicitly and
following the job from one generation to the next with ``release()`` / ``rebind(...)``:
``RankContext`` and ``MegatronObjects`` (per generation), ``SnapshotPipeline`` (schedule,
windows, copies, replication, persistence), ``UpstreamLog`` (logs and replay routing),
``RecoveryCoordinator`` (under the ``FailurePolicy``); plus the fault injector, the failure
detector and the metrics writer.

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

Across an in-place replacement (Megatron's ``--inprocess-restart``, ``adapter.nvrx_restart``):
``suspend`` on a survivor of the failed generation, ``resume`` in the next one; a reserve rank
joins (``joining``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from megatron_moetion.adapter import rng_state
from megatron_moetion.adapter.failure_detection import FailureDetector
from megatron_moetion.adapter.failure_policy import FailurePolicy
from megatron_moetion.adapter.fault_injection import (
    FIRED_LOG,
    FaultInjector,
    firing_forward_step,
    terminate_self,
)
from megatron_moetion.adapter.ft_sections import outside_the_step_section
from megatron_moetion.adapter.megatron_objects import MegatronObjects
from megatron_moetion.adapter.optimizer_layout import (
    ensure_optimizer_state,
    restore_optimizer_caches,
)
from megatron_moetion.adapter.rank_context import RankContext
from megatron_moetion.adapter.rank_state import capture_buffers, restore_buffers
from megatron_moetion.adapter.recovery import RecoveryCoordinator
from megatron_moetion.adapter.snapshot_pipeline import SnapshotPipeline
from megatron_moetion.adapter.support import check_supported
from megatron_moetion.adapter.upstream import UpstreamLog
from megatron_moetion.agreement import Agreement, agree
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.fault_plan import FaultPlan
from megatron_moetion.metrics import MetricsWriter

logger = logging.getLogger(__name__)


class MoEtionSession:
    """Everything MoEtion keeps on one rank (see module docstring).

    Args:
        cfg: the validated configuration.
        model: Megatron's list of (DDP-wrapped) model chunks.
        optimizer: Megatron's (chained) optimizer.
        scheduler: Megatron's ``OptimizerParamScheduler``.
        args: Megatron's parsed arguments.
        last_checkpoint_iteration: iteration of the checkpoint ``--load`` restored, if any.
        joining: set on a reserve rank that replaces a dead rank (``adapter.nvrx_restart``): where
            the survivors resume (what ``suspend`` returned on them).
        restart_engine: what replaces dead ranks in place (``Runtime.restart_engine``); with
            ``"nvrx"`` its monitor detects failures and MoEtion runs no heartbeats of its own.
    """

    def __init__(self, cfg: MoEtionConfig, model, optimizer, scheduler, args,
                 last_checkpoint_iteration: int | None = None, joining: dict | None = None,
                 restart_engine: str | None = None):
        check_supported(args, cfg, restart_engine)
        self.cfg, self.restart_engine = cfg, restart_engine
        self.ctx = RankContext.connect(cfg)
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.objects = MegatronObjects.bind(model, optimizer, scheduler, args)
        self.metrics = MetricsWriter(cfg.metrics_file, self.rank)
        self.policy = FailurePolicy(self.rank, self.world_size, args, self.metrics,
                                    last_checkpoint_iteration)
        self.upstream = UpstreamLog(self.ctx.device, log_boundary=cfg.upstream_logging)
        self.upstream.rebind(self.ctx)
        self.pipeline = SnapshotPipeline(cfg, self.ctx, self.objects, self.upstream.store,
                                         probe=joining is None)
        self.recovery = RecoveryCoordinator(cfg, self.policy, self.pipeline, self.upstream,
                                            self.fire, self.shutdown)
        self.recovery.rebind(self.ctx, self.objects)
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
        self.agreed = Agreement((), -1, -1, 1)
        self.iteration = 0
        self.first_iteration: int | None = None
        self.recoveries: list[dict] = []
        self.corrupt_next_round = False  # a corrupt_replica fault waits for the next round
        self.partners_checked = False
        self.start_state: dict | None = None  # RNG, router buffers, counters at its start
        self.resume_at: int | None = None  # survivors of a replaced rank: iteration resumed
        self.stepped = -1  # the last iteration whose optimizer step ran on this rank
        self.in_step = False  # between the agreement and the end of the optimizer step
        self.kept_state: dict | None = None  # a survivor between two generations
        self._num_microbatches = None
        self._iter: dict = {}
        self._stall = 0.0
        self._closed = False
        if joining is not None:
            self._join(joining)
        self.detector = self._start_detector()
        if joining is None:
            self.policy.report_restart(self.faults.fired_before)
            self._restore_checkpoint_rng()
        if self.rank == 0:
            logger.warning("[moetion] on: %d operators on rank 0, %d buddies per rank, copy "
                           "bandwidth %.2f GB/s, network %.2f GB/s (rank 0's shares)",
                           len(self.objects.bindings), self.ctx.topology.num_buddies,
                           self.pipeline.copy_bandwidth / 1e9,
                           self.pipeline.network_bandwidth / 1e9)

    def _start_detector(self) -> FailureDetector | None:
        if self.restart_engine == "nvrx":
            return None  # the Wrapper's monitor detects failures
        detector = FailureDetector(self.cfg, self.rank, self.world_size, self.policy,
                                   lambda: self.iteration)
        detector.start()
        return detector

    @property
    def last_checkpoint_iteration(self) -> int | None:
        return self.policy.last_checkpoint_iteration

    # ------------------------------------------------------------------ faults
    def fire(self, phase: str, **kwargs) -> None:
        if self.detector is not None:
            self.detector.progress(self.iteration, phase)
        for fault in self.faults.due(phase, self.iteration, **kwargs):
            self._carry_out(fault)

    def _carry_out(self, fault) -> None:
        if fault.kind == "lose_state":
            self.lose_state()
        elif fault.kind == "corrupt_replica":
            self.corrupt_next_round = True
        elif fault.kind in ("kill", "hang"):
            terminate_self(fault.kind)

    def lose_state(self) -> None:
        """Carry out a ``lose_state`` fault: this rank forgets everything it held."""
        self.pipeline.lose()
        self.upstream.store.wipe()
        self.objects.state.wipe(
            [buf for b in self.objects.bindings for buf in b.buffers])
        self.recovery.mark_lost()

    # ------------------------------------------------------------------ the schedule
    def wrap_forward_backward_func(self, forward_backward_func):
        session = self

        def moetion_forward_backward(**kwargs):
            if kwargs.get("forward_only", False):
                return forward_backward_func(**kwargs)
            session.upstream.install_communicator(kwargs, session.objects.model)
            session._num_microbatches = kwargs["num_microbatches"]
            template = dict(kwargs)
            rerun = False
            while True:
                call = dict(template)
                call["forward_step_func"] = firing_forward_step(
                    template["forward_step_func"], session.faults, session.iteration,
                    session.fire)
                session.upstream.begin(session.iteration)
                if rerun:
                    call["data_iterator"] = session.upstream.replay_iterator(
                        session.iteration, like=template.get("data_iterator"))
                elif template.get("data_iterator") is not None and session.pipeline.ships_data:
                    call["data_iterator"] = session._read_ahead_and_ship(template)
                elif template.get("data_iterator") is not None:
                    call["data_iterator"] = session.upstream.recording(template["data_iterator"])
                session.objects.probe.begin_iteration()
                start = time.perf_counter()
                out = forward_backward_func(**call)
                if not rerun:
                    session.pipeline.note_fwd_bwd(time.perf_counter() - start)
                    session.recovery.reads_data = session.upstream.items_read() > 0
                session.fire("step")
                if not session._agree_and_recover(template, forward_backward_func):
                    return out
                rerun = True

        return moetion_forward_backward

    def _read_ahead_and_ship(self, template):
        """PP = 1: read the iteration's micro-batches before the schedule and ship them to the
        buddies, so that a rank failing during it can replay it (nobody else read them)."""
        ahead = self.upstream.read_ahead(template["data_iterator"],
                                         template["num_microbatches"])
        t0 = time.perf_counter()
        self.pipeline.ship_data(self.iteration,
                                self.upstream.store.export("data", [self.iteration]))
        self._stall += time.perf_counter() - t0
        return ahead

    def _agree_and_recover(self, template, forward_backward_func) -> bool:
        """The per-iteration agreement; on failures run the recovery, return True to re-run."""
        t0 = time.perf_counter()
        finished, acked = self.pipeline.status()
        self.agreed = agree(self.ctx.control_group, self.world_size, self.rank,
                            lost=self.recovery.lost, finished_round=finished,
                            acked_window=acked, window_proposal=self.pipeline.proposal())
        self._stall += time.perf_counter() - t0
        if not self.agreed.failed:
            self._stall += self.pipeline.wait_for_copies()
            self.in_step = True  # the optimizer step comes next
            return False
        # --enable-ft-package: a recovery is not a step
        section = (contextlib.nullcontext() if "recovery_in_step_section" in
                   self.cfg.negative_controls else outside_the_step_section())
        with section:
            time.sleep(self.cfg.debug_recovery_delay_s)
            report = self.recovery.recover(self.agreed.failed, self.iteration,
                                           self.start_state, self.agreed, template,
                                           forward_backward_func)
        self.recoveries.append(report)
        self.policy.emit(report)
        self.objects.zero_grads()
        return True

    # ------------------------------------------------------------------ per-iteration hooks
    def on_train_step_start(self, iteration: int) -> None:
        t0 = time.perf_counter()
        self._stall, self.iteration, self.in_step = 0.0, iteration, False
        self._iter = {"iteration": iteration}
        if self.first_iteration is None:
            self.first_iteration = iteration
            self.pipeline.start(iteration)
        if self.detector is not None:
            self.detector.progress(iteration, "train")
        if self.resume_at == iteration:  # resumed in place: this start ran in the last generation
            self.resume_at = None
            self._stall += time.perf_counter() - t0
            return
        fail_after = []
        if self.pipeline.closes_now(iteration):  # a replication round starts now
            for fault in self.faults.due("replication", iteration, at_or_after=True):
                if fault.kind == "corrupt_replica":
                    self.corrupt_next_round = True
                else:
                    fail_after.append(fault)
        corrupt, self.corrupt_next_round = self.corrupt_next_round, False
        out = self.pipeline.boundary(iteration, self.agreed, corrupt)
        for fault in fail_after:
            self._carry_out(fault)  # while the round runs: its copies may or may not arrive
        if "persisted_start" in out:
            floor = out.pop("persisted_start")
            self.upstream.store.truncate(floor)
            self.pipeline.truncate_data(floor)
        self._iter.update(out)
        args = self.objects.args
        self.start_state = {
            "rng": rng_state.capture_rng(),
            "buffers": capture_buffers(self.objects.router_buffers),
            "sched_steps": getattr(self.objects.scheduler, "num_steps", 0),
            "consumed": int(args.consumed_train_samples),
            "flops": getattr(args, "num_floating_point_operations_so_far", 0)}
        self._stall += time.perf_counter() - t0

    def on_optimizer_step_end(self, iteration: int, update_successful: bool, grad_norm) -> None:
        t0 = time.perf_counter()
        self.stepped, self.in_step = iteration, False
        probe = self.objects.probe.last
        steps = getattr(self.objects.scheduler, "num_steps", 0)
        record = {"grad_norm": probe.get("grad_norm"),
                  "found_inf": dict(probe.get("found_inf", {})),
                  "num_zeros": probe.get("num_zeros"),
                  "update_successful": update_successful,
                  "num_microbatches": self._num_microbatches,
                  "increment": steps - self.start_state["sched_steps"]}
        self.upstream.store.log_record(iteration, record)
        meta = {"iteration": iteration, "record": record, **self.objects.state.step_state()}
        self._iter.update(update_successful=update_successful,
                          grad_norm=None if grad_norm is None else float(grad_norm))
        self._iter.update(self.pipeline.capture(iteration, meta))
        if self.cfg.debug_dump_dir and self.pipeline.windows.current is not None:
            self._debug_dump_live(iteration)
        self._stall += time.perf_counter() - t0

    def on_train_step_end(self, iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
        t0 = time.perf_counter()
        self.pipeline.end_of_iteration(iteration, int(self.objects.args.consumed_train_samples))
        if iteration == self.first_iteration and not self.partners_checked:
            self.partners_checked = True
            self.recovery.check_data_partners(iteration)
        self._stall += time.perf_counter() - t0
        self.fire("snapshot")  # the snapshot of this iteration is lost with the rank
        self._emit_metrics(iteration)

    def _emit_metrics(self, iteration: int) -> None:
        logs = self.upstream.store
        record = dict(self._iter)
        record.update(self.pipeline.metrics())
        record.update(rank=self.rank, stall_ms=self._stall * 1e3, log_bytes=logs.nbytes(),
                      logs_dropped_iterations=logs.dropped_iterations,
                      replication_bytes=self.ctx.transport.bytes_sent)
        self.metrics.write(record)
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is not None:
            for key in ("stall_ms", "snapshot_bytes", "host_bytes_held", "log_bytes"):
                if record.get(key) is not None:
                    writer.add_scalar(f"moetion/{key}", record[key], iteration)

    def on_checkpoint_save(self, iteration: int, non_persistent: bool) -> None:
        if not non_persistent:
            self.policy.checkpoint_saved(iteration)
            if getattr(self.objects.args, "save", None):
                rng_state.save_checkpoint_rng(self.objects.args.save, iteration, self.rank)

    def _restore_checkpoint_rng(self) -> None:
        """After ``--load`` resumed a checkpoint (the session is built once the data iterators
        exist): this rank's own RNG streams of that checkpoint (``rng_state``)."""
        load = getattr(self.objects.args, "load", None)
        if self.last_checkpoint_iteration is not None and load:
            rng_state.restore_checkpoint_rng(load, self.last_checkpoint_iteration, self.rank)

    # ------------------------------------------------------------------ generations
    def _join(self, resume: dict) -> None:
        """A reserve rank taking a dead rank's place: it holds no window, replica or log, and
        its optimizer has no state yet (a restore writes into it)."""
        ensure_optimizer_state(self.objects.optimizer)
        restore_optimizer_caches(self.objects.optimizer, resume.get("optimizer_caches", []))
        self.recovery.mark_lost()
        self.first_iteration = int(resume["iteration"])
        self.pipeline.continue_numbering(resume["next_window_id"], resume["last_round"],
                                         self.first_iteration)
        self.pipeline.adopt_bandwidths(resume.get("bandwidths"))
        self.partners_checked = True  # the survivors checked data partners at the start

    def suspend(self) -> dict:
        """A survivor of a failed generation: stop what runs in the background, keep this
        rank's training state as plain tensors (windows, replicas and logs stay in memory),
        drop every reference to the generation's Megatron objects and process groups (a
        group's sockets close only once nothing refers to it, and peers blocked on this rank
        are released by that), and say where this rank stands."""
        self.pipeline.stop_for_handover()
        self.kept_state = self.objects.state.state_dict()
        if "stale_survivors" in self.cfg.negative_controls:  # survivors lose optimizer state
            self.kept_state["main"] = [(n, a, b, m, {}) for n, a, b, m, _ in
                                       self.kept_state["main"]]
        caches = self.kept_state["caches"]
        self.objects.release()
        self.pipeline.release()
        self.upstream.release()
        self.recovery.release()
        self.objects = self.ctx = None
        if self.in_step:  # stopped inside the optimizer step: the state may be partly stepped
            return {"iteration": self.iteration, "in_step": True}
        if self.stepped >= self.iteration:  # stopped after this iteration's optimizer step
            return {"iteration": self.iteration + 1, "after_step": True}
        self.resume_at = self.iteration
        self.upstream.drop_aborted(self.iteration)  # the aborted attempt's logs are partial
        return {"iteration": self.iteration,
                # the job's window and round numbering, which a spare continues
                **self.pipeline.numbering(),
                "bandwidths": self.pipeline.bandwidths(),
                "optimizer_caches": caches,
                "consumed_train_samples": self.start_state["consumed"],
                "flops": self.start_state["flops"],
                "last_checkpoint_iteration": self.last_checkpoint_iteration}

    def resume(self, model, optimizer, scheduler, args) -> None:
        """Next generation, on a survivor: move the kept state into the objects Megatron just
        built on the new process groups (nothing is read from disk or replayed), and rebind
        every component to them."""
        self.ctx = RankContext.connect(self.cfg)
        self.objects = MegatronObjects.bind(model, optimizer, scheduler, args)
        self.objects.state.load_state_dict(self.kept_state)
        self.kept_state = None
        self.policy.rebind(args)
        self.upstream.rebind(self.ctx)
        self.pipeline.rebind(self.ctx, self.objects)
        self.recovery.rebind(self.ctx, self.objects)
        rng_state.restore_rng(self.start_state["rng"])
        restore_buffers(self.objects.router_buffers, self.start_state["buffers"])
        self.detector = self._start_detector()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.detector is not None:
            self.detector.stop()  # a finished rank is not a dead one
        self.pipeline.close()
        if self.cfg.debug_dump_dir:
            self.pipeline.dump_replicas(self.cfg.debug_dump_dir)
        if self.objects is not None:
            self.objects.release()
        self.metrics.close()

    def _debug_dump_live(self, iteration: int) -> None:
        """Tests only: the live state after this iteration's optimizer step, by name."""
        state = {k: v.detach().clone() for k, v in self.objects.state.named_tensors().items()}
        path = f"{self.cfg.debug_dump_dir}/live/rank{self.rank}.iter{iteration}.pt"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
