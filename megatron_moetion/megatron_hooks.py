"""The entry points the patched Megatron-LM calls, one line per call site.

In the style of ``megatron/training/ft_integration.py``: every hook does nothing while
``--moetion`` is off (the only exception is ``--moetion-oracle-dir``, the determinism dump,
which also works without MoEtion so that MoEtion-on and MoEtion-off runs can be compared).
Call order, on every rank::

    add_arguments(parser)                        # arguments.py, while building the parser
    validate_args(args)                          # arguments.py, end of validate_args(): bad
                                                 # values, unsupported configurations refused
    on_checkpoint_load(iteration)                # only where --load found a checkpoint
    setup(model, optimizer, scheduler, args)     # pretrain(), once model and data exist
    wrap_forward_backward_func(fn) -> fn         # train(), once
    per iteration t (1-based, as Megatron logs it):
        on_train_step_start(t)
        (the wrapped forward_backward_func runs inside train_step)
        on_optimizer_step_end(t, update_successful, grad_norm)
        on_train_step_end(t, loss_dict, grad_norm, skipped_iter)
        on_checkpoint_save(t, non_persistent)   # on iterations that save
    shutdown()                                   # end of training (both exit paths)

This module imports no Megatron code at import time (``arguments.py`` imports it while
Megatron itself is being imported); the adapter does, lazily.
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_moetion import config as _config

logger = logging.getLogger(__name__)


class _State:
    cfg: _config.MoEtionConfig | None = None
    session: Any = None  # adapter.session.MoEtionSession while MoEtion is on
    oracle: Any = None  # oracle.OracleRecorder while --moetion-oracle-dir is set
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None  # Megatron's OptimizerParamScheduler (for the oracle's state)
    last_checkpoint_load: int | None = None
    last_checkpoint_save: int | None = None
    # in-place replacement (adapter.inprocess): where the next generation resumes, and the
    # session a survivor keeps across it
    resume: dict | None = None
    kept: Any = None
    saved_load: tuple | None = None


_state = _State()


def add_arguments(parser):
    """Add the ``--moetion*`` argument group to Megatron's parser."""
    return _config.add_arguments(parser)


def validate_args(args) -> None:
    """Check the ``--moetion*`` flags against the rest of Megatron's validated ``args``.

    Raises ``ConfigError`` for a bad ``--moetion*`` value (with or without ``--moetion``) and,
    with ``--moetion`` on, ``UnsupportedConfigurationError`` listing every configuration MoEtion
    cannot replay exactly, each with its flag and the reason (``adapter.support``). Runs inside
    Megatron's ``validate_args``, so a refused job stops before any model is built; the session
    checks again for entry points that skip it.
    """
    cfg = _config.from_args(args)
    if cfg.enabled:
        from megatron_moetion.adapter.support import check_supported

        check_supported(args, cfg)


def setup(model, optimizer, opt_param_scheduler, args) -> None:
    """Read the flags and, if MoEtion is on, build the per-rank session."""
    import torch.distributed as dist

    cfg = _config.from_args(args)
    _state.cfg, _state.model, _state.optimizer = cfg, model, optimizer
    _state.scheduler = opt_param_scheduler
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.oracle_dir and _state.oracle is None:
        from megatron_moetion.oracle import OracleRecorder

        _state.oracle = OracleRecorder(cfg.oracle_dir, rank, cfg.oracle_interval)
    if _state.resume is not None:
        _resume_generation(model, optimizer, opt_param_scheduler, args, cfg)
    elif cfg.enabled:
        from megatron_moetion.adapter.session import MoEtionSession

        _state.session = MoEtionSession(
            cfg, model, optimizer, opt_param_scheduler, args,
            last_checkpoint_iteration=_state.last_checkpoint_load,
        )


def prepare_arguments(args) -> None:
    """Call between parsing the arguments and ``pretrain()`` (the in-process replacement's
    entry does): in a generation after a replacement, ``--load`` is skipped (survivors keep
    their state, the spare is restored by the recovery) and the data iterators start where
    the interrupted iteration started."""
    if _state.resume is None:
        return
    _state.saved_load = (args.load, getattr(args, "pretrained_checkpoint", None))
    args.load, args.pretrained_checkpoint = None, None
    args.consumed_train_samples = int(_state.resume["consumed_train_samples"])


def _resume_generation(model, optimizer, opt_param_scheduler, args, cfg) -> None:
    resume, kept = _state.resume, _state.kept
    _state.resume, _state.kept = None, None
    if _state.saved_load is not None:
        args.load, args.pretrained_checkpoint = _state.saved_load
    args.iteration = int(resume["iteration"]) - 1
    args.num_floating_point_operations_so_far = resume["flops"]
    if not cfg.enabled:
        raise RuntimeError("warm spares need --moetion (the session keeps the state)")
    if kept is not None:
        from megatron_moetion.adapter import handover

        handover.rebind(kept, model, optimizer, opt_param_scheduler, args)
        _state.session = kept
    else:
        from megatron_moetion.adapter.session import MoEtionSession

        _state.session = MoEtionSession(
            cfg, model, optimizer, opt_param_scheduler, args,
            last_checkpoint_iteration=resume.get("last_checkpoint_iteration"), joining=resume)


def join_next_generation(resume: dict) -> None:
    """A warm spare: its first ``pretrain()`` resumes where the survivors stand."""
    _state.resume = dict(resume)


def keep_for_next_generation(session, resume: dict) -> None:
    """A survivor: the next ``pretrain()`` moves ``session``'s state into the new objects."""
    _state.kept, _state.resume = session, dict(resume)


def forget_generation() -> None:
    """A failed generation's Megatron objects are gone (its session is kept by the caller)."""
    _state.session, _state.model, _state.optimizer = None, None, None
    _state.scheduler = None  # it holds the failed generation's optimizer (and its groups)


def wrap_forward_backward_func(forward_backward_func):
    """Return the schedule function the training loop should call (unchanged when off)."""
    if _state.session is None:
        return forward_backward_func
    return _state.session.wrap_forward_backward_func(forward_backward_func)


def on_train_step_start(iteration: int) -> None:
    if _state.session is not None:
        _state.session.on_train_step_start(iteration)


def on_optimizer_step_end(iteration: int, update_successful, grad_norm) -> None:
    if _state.session is not None:
        _state.session.on_optimizer_step_end(iteration, bool(update_successful), grad_norm)


def on_train_step_end(iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
    if _state.oracle is not None:
        _record_for_oracle(iteration, loss_dict, grad_norm, skipped_iter)
    if _state.session is not None:
        _state.session.on_train_step_end(iteration, loss_dict, grad_norm, skipped_iter)


def _record_for_oracle(iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
    """The oracle's per-iteration record and, every ``K``-th committed iteration, the rank's
    whole state (this hook runs once per committed iteration, before ``training_log`` reduces
    and clears the auxiliary-loss trackers)."""
    from megatron_moetion.adapter.rank_state import loss_metrics, oracle_state

    oracle = _state.oracle
    losses = {k: float(v.item() if hasattr(v, "item") else v)
              for k, v in (loss_dict or {}).items()}
    norm = None if grad_norm is None else float(grad_norm)
    oracle.record_iteration(iteration, losses, norm, int(skipped_iter), metrics=loss_metrics())
    if oracle.wants_state(iteration) and _state.model is not None:
        tensors, scalars = oracle_state(_state.model, _state.optimizer, _state.scheduler)
        oracle.dump_state(tensors, scalars, iteration=iteration)


def on_checkpoint_save(iteration: int, non_persistent: bool = False) -> None:
    if not non_persistent:
        _state.last_checkpoint_save = iteration
    if _state.session is not None:
        _state.session.on_checkpoint_save(iteration, non_persistent)


def on_checkpoint_load(iteration: int) -> None:
    _state.last_checkpoint_load = iteration


def shutdown() -> None:
    """Finish background work, write the oracle dump; safe to call more than once."""
    session, _state.session = _state.session, None
    if session is not None:
        session.shutdown()
    oracle, _state.oracle = _state.oracle, None
    if oracle is not None and _state.model is not None:
        from megatron_moetion.adapter.rank_state import oracle_state

        tensors, scalars = oracle_state(_state.model, _state.optimizer, _state.scheduler)
        oracle.dump_state(tensors, scalars,
                          meta={"last_checkpoint_save": _state.last_checkpoint_save})


def session():
    """The live ``MoEtionSession`` (or None); for the demo and tests."""
    return _state.session
