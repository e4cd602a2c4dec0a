"""The MoEtion runtime of one process: what the hooks act on, owned by the process's driver.

``Runtime`` holds what lives longer than one call of Megatron's ``pretrain()``: the
configuration, the rank's session (while ``--moetion`` is on), the oracle tap (while
``--moetion-oracle-dir`` is set), the checkpoint iterations Megatron reported, and, across an
in-place replacement, the survivor's suspended session and where the next generation resumes.
``megatron_hooks`` is a stateless facade over ``current()``; under ``--inprocess-restart``
``adapter.nvrx_restart`` owns the runtime it installs and drives the generation changes on it.

This module imports neither torch nor Megatron at import time (``megatron_hooks`` imports it
while Megatron itself is being imported); what it builds, it imports when it builds it.
"""

from __future__ import annotations

from typing import Any

from megatron_moetion import config as _config


class Runtime:
    """See the module docstring."""

    def __init__(self, restart_engine: str | None = None):
        # what restarts ranks in place: None (nothing: a dead rank means a restart from the
        # persistent checkpoint) or "nvrx" (Megatron's --inprocess-restart: adapter.nvrx_restart)
        self.restart_engine = restart_engine
        self.cfg: _config.MoEtionConfig | None = None
        self.session: Any = None  # adapter.session.MoEtionSession while MoEtion is on
        self.oracle: Any = None  # adapter.oracle_tap.OracleTap while --moetion-oracle-dir
        self.last_checkpoint_load: int | None = None
        self.last_checkpoint_save: int | None = None
        # in-place replacement: where the next generation resumes, the survivor's suspended
        # session, and the --load it skips
        self.resume: dict | None = None
        self.suspended: Any = None
        self.saved_load: tuple | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, model, optimizer, scheduler, args) -> None:
        """Read the flags and, if MoEtion is on, build (or resume) the rank's session."""
        import torch.distributed as dist

        cfg = _config.from_args(args)
        self.cfg = cfg
        rank = dist.get_rank() if dist.is_initialized() else 0
        if cfg.oracle_dir and self.oracle is None:
            from megatron_moetion.adapter.oracle_tap import OracleTap

            self.oracle = OracleTap(cfg.oracle_dir, rank, cfg.oracle_interval)
        if self.oracle is not None:
            self.oracle.bind(model, optimizer, scheduler)
        if self.resume is not None:
            self._resume_generation(model, optimizer, scheduler, args, cfg)
        elif cfg.enabled:
            from megatron_moetion.adapter.session import MoEtionSession

            self.session = MoEtionSession(cfg, model, optimizer, scheduler, args,
                                          last_checkpoint_iteration=self.last_checkpoint_load,
                                          restart_engine=self.restart_engine)

    def prepare_arguments(self, args) -> None:
        """In a generation after a replacement, ``--load`` is skipped (survivors keep their
        state, the reserve rank is restored by the recovery) and the data iterators start where the
        interrupted iteration started."""
        if self.resume is None:
            return
        self.saved_load = (args.load, getattr(args, "pretrained_checkpoint", None))
        args.load, args.pretrained_checkpoint = None, None
        args.consumed_train_samples = int(self.resume["consumed_train_samples"])

    def _resume_generation(self, model, optimizer, scheduler, args, cfg) -> None:
        resume, suspended = self.resume, self.suspended
        self.resume, self.suspended = None, None
        if self.saved_load is not None:
            args.load, args.pretrained_checkpoint = self.saved_load
        args.iteration = int(resume["iteration"]) - 1
        args.num_floating_point_operations_so_far = resume["flops"]
        if not cfg.enabled:
            raise RuntimeError("an in-place restart needs --moetion (the session keeps the state)")
        if suspended is not None:
            suspended.resume(model, optimizer, scheduler, args)
            self.session = suspended
        else:
            from megatron_moetion.adapter.session import MoEtionSession

            self.session = MoEtionSession(
                cfg, model, optimizer, scheduler, args,
                last_checkpoint_iteration=resume.get("last_checkpoint_iteration"),
                joining=resume, restart_engine=self.restart_engine)

    # ------------------------------------------------------------------ generations
    def join_next_generation(self, resume: dict) -> None:
        """A reserve rank: its first ``pretrain()`` resumes where the survivors stand."""
        self.resume = dict(resume)

    def suspend_session(self) -> dict:
        """A survivor of a failed generation: suspend the session (``MoEtionSession.suspend``)
        and forget the generation's Megatron objects; return where this rank stands."""
        session, self.session = self.session, None
        kept = session.suspend()
        self.suspended = session
        if self.oracle is not None:
            self.oracle.bind(None, None, None)  # they hold the failed generation's groups
        return kept

    def resume_next_generation(self, resume: dict) -> None:
        """A survivor: the next ``pretrain()`` moves the suspended session's state into the
        new objects."""
        self.resume = dict(resume)

    # ------------------------------------------------------------------ per iteration
    def wrap_forward_backward_func(self, forward_backward_func):
        if self.session is None:
            return forward_backward_func
        return self.session.wrap_forward_backward_func(forward_backward_func)

    def on_train_step_start(self, iteration: int) -> None:
        if self.session is not None:
            self.session.on_train_step_start(iteration)

    def on_optimizer_step_end(self, iteration: int, update_successful, grad_norm) -> None:
        if self.session is not None:
            self.session.on_optimizer_step_end(iteration, bool(update_successful), grad_norm)

    def on_train_step_end(self, iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
        if self.oracle is not None:
            self.oracle.on_train_step_end(iteration, loss_dict, grad_norm, skipped_iter)
        if self.session is not None:
            self.session.on_train_step_end(iteration, loss_dict, grad_norm, skipped_iter)

    def on_checkpoint_save(self, iteration: int, non_persistent: bool = False) -> None:
        if not non_persistent:
            self.last_checkpoint_save = iteration
        if self.session is not None:
            self.session.on_checkpoint_save(iteration, non_persistent)

    def on_checkpoint_load(self, iteration: int) -> None:
        self.last_checkpoint_load = iteration

    def shutdown(self) -> None:
        """Finish background work, write the oracle dump; safe to call more than once."""
        session, self.session = self.session, None
        if session is not None:
            session.shutdown()
        oracle, self.oracle = self.oracle, None
        if oracle is not None:
            oracle.finish(self.last_checkpoint_save)


_current: Runtime | None = None


def current() -> Runtime:
    """The process's runtime: the one a driver installed, else a fresh one (plain
    ``pretrain_gpt.py``)."""
    global _current
    if _current is None:
        _current = Runtime()
    return _current


def install(runtime: Runtime) -> Runtime:
    """Make ``runtime`` the one the hooks act on (``adapter.nvrx_restart`` does, per process)."""
    global _current
    _current = runtime
    return runtime
