"""The entry points the patched Megatron-LM calls, one line per call site.

In the style of ``megatron/training/ft_integration.py``: every hook does nothing while
``--moetion`` is off (the only exception is ``--moetion-oracle-dir``, the determinism dump,
which also works without MoEtion so that MoEtion-on and MoEtion-off runs can be compared).
Call order, on every rank::

    wrap_for_inprocess_restart(pretrain)         # inprocess_restart.py, before the arguments
                                                 # are parsed (pretrain_gpt.py's main)
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

The hooks hold no state: each forwards to the process's ``adapter.runtime.Runtime``
(``runtime.current()``; under ``--inprocess-restart`` the one ``adapter.nvrx_restart`` installs,
which lives across the restarts). This module imports no Megatron code at import time (``arguments.py`` imports it while Megatron itself is being imported), and
neither does the runtime module; what they build, they import lazily.
"""

from __future__ import annotations

from megatron_moetion import config as _config
from megatron_moetion.adapter import runtime as _runtime


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

        check_supported(args, cfg, restart_engine=_runtime.current().restart_engine)


def setup(model, optimizer, opt_param_scheduler, args) -> None:
    """Read the flags and, if MoEtion is on, build the per-rank session."""
    _runtime.current().setup(model, optimizer, opt_param_scheduler, args)


def wrap_for_inprocess_restart(pretrain):
    """First thing in Megatron's ``maybe_wrap_for_inprocess_restart(pretrain)``: with
    ``--inprocess-restart`` and ``--moetion``, ``(pretrain, store)`` wrapped in
    nvidia-resiliency-ext's Wrapper with MoEtion's kept-state handover
    (``adapter.nvrx_restart``); None where Megatron's own wrapping applies."""
    from megatron_moetion.adapter.nvrx_restart import wrap_pretrain

    return wrap_pretrain(pretrain)


def wrap_forward_backward_func(forward_backward_func):
    """Return the schedule function the training loop should call (unchanged when off)."""
    return _runtime.current().wrap_forward_backward_func(forward_backward_func)


def on_train_step_start(iteration: int) -> None:
    _runtime.current().on_train_step_start(iteration)


def on_optimizer_step_end(iteration: int, update_successful, grad_norm) -> None:
    _runtime.current().on_optimizer_step_end(iteration, update_successful, grad_norm)


def on_train_step_end(iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
    _runtime.current().on_train_step_end(iteration, loss_dict, grad_norm, skipped_iter)


def on_checkpoint_save(iteration: int, non_persistent: bool = False) -> None:
    _runtime.current().on_checkpoint_save(iteration, non_persistent)


def on_checkpoint_load(iteration: int) -> None:
    _runtime.current().on_checkpoint_load(iteration)


def shutdown() -> None:
    """Finish background work, write the oracle dump; safe to call more than once."""
    _runtime.current().shutdown()

