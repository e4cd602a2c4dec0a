"""Megatron's ``--inprocess-restart`` as the engine of in-place replacement.

nvidia-resiliency-ext's in-process ``Wrapper`` does what a restart in place needs from outside
the training code: a monitor process per rank (a killed rank, a rank whose main thread stops
making progress: soft and hard timeouts, hung ranks are killed), the abort of every rank's
process groups, the assignment of a warm reserve rank to the dead rank's place (``Tree`` with
a ``RESERVE`` layer of ``--inprocess-active-world-size`` ranks), and calling the training
function again in the same processes. MoEtion adds what the Wrapper lacks:

* **kept state**: survivors re-enter holding their model, optimizer, windows, replicas and
  logs; between two calls each suspends its session and moves it into the objects Megatron
  builds next (``MoEtionSession.suspend`` / ``resume``); ``--load`` is skipped;
* **where to resume**: every rank publishes where it stands in the application store; all
  agree on one iteration or every rank falls back to the persistent checkpoint
  (``decide_resume``); the reserve rank joins holding nothing, and the localized recovery
  restores it from its buddies and neighbours;
* **releasing blocked peers**: gloo has no abort, and a survivor blocked in a collective with a
  survivor waits for its timeout; ``ReleasePeerConnections`` shuts this process's peer sockets
  down (the stores' excepted) before the Wrapper destroys the groups;
* **finalize on CPU**: Megatron's ``ThreadedFinalize`` needs CUDA; ``MegatronFinalize`` tears
  Megatron's global state down in the main thread;
* **Megatron's arguments per call**: ``pretrain_gpt.py`` parses them once, outside the wrapped
  ``pretrain()``; ``wrap_pretrain`` (called by the patched ``maybe_wrap_for_inprocess_restart``)
  lets that validation see the active world and re-sets them per call from the rank and size
  the Wrapper assigned;
* **stores that outlive every rank**: by default initial rank 0 hosts the Wrapper's store and
  the application store, and its death ends the job; with ``MOETION_EXTERNAL_STORES=1`` both
  live in ``python -m megatron_moetion.store_host`` (``store_host``) and every rank, rank 0
  included, is replaceable;
* **Megatron's module state**: ``megatron.training`` keeps set-up state in module globals that
  decides which set-up collectives run; every call starts from a fresh process's
  (``module_state`` / ``restore_module_state``), as the reserve rank does.

What stays with the Wrapper and its limits: a hung rank is only released after
``--inprocess-soft-timeout``; the Wrapper's own processes (one monitor per rank) cost a fork each.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import sys
import time
import typing
from datetime import timedelta

from megatron_moetion.adapter.failure_policy import FailurePolicy, Outcome
from megatron_moetion.adapter.runtime import Runtime, install
from megatron_moetion.replacement import shut_down_peer_connections, survivor_conflict
from megatron_moetion.store_host import (
    APP_STORE_PORT_OFFSET,
    WRAPPER_STORE_PORT_OFFSET,
    external_stores,
)

logger = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 120.0
_STATEFUL_MODULES = ("megatron.training.training", "megatron.training.checkpointing")


def module_state() -> dict:
    """Module-level state of Megatron's training code as a fresh process has it. Survivors
    restore it before calling ``pretrain()`` again: it decides which set-up collectives run
    (``_STARTUP_TIMESTAMPS`` adds an all-reduce once set), and a reserve rank runs with it
    fresh."""
    state = {}
    for name in _STATEFUL_MODULES:
        module = importlib.import_module(name)
        for key, value in vars(module).items():
            if key.startswith("_") and key[1:2].isupper() and (
                    value is None or isinstance(value, (bool, int, float, str, dict))):
                state[(name, key)] = copy.deepcopy(value)
    return state


def restore_module_state(state: dict) -> None:
    for (name, key), value in state.items():
        setattr(sys.modules[name], key, copy.deepcopy(value))


def decide_resume(handoffs: dict[int, dict]) -> tuple[dict | None, str]:
    """Where every rank resumes after a restart, from what each published (``{"resume": ...,
    "initial_rank": ...}``; ``resume`` None: a rank that holds no training state, a reserve
    rank just activated). Returns ``(resume, "")``, or ``(None, reason)`` for a fallback to the
    persistent checkpoint; ``({}, "")`` when no rank holds state (the restart loads ``--load``)."""
    kept = {r: h["resume"] for r, h in handoffs.items() if h.get("resume") is not None}
    if not kept:
        return {}, ""
    reason = survivor_conflict(kept)
    if reason:
        return None, reason
    return next(iter(kept.values())), ""


def _inprocess():
    import nvidia_resiliency_ext.inprocess as inprocess

    return inprocess


class _Hooks:
    """The Wrapper's abort and finalize steps MoEtion adds (built lazily: nvrx is optional)."""

    @staticmethod
    def release_peers(ports: tuple[int, ...]):
        class ReleasePeerConnections(_inprocess().abort.Abort):
            def __call__(self, state):
                shut_down_peer_connections(*ports)
                return state

        return ReleasePeerConnections()

    @staticmethod
    def finalize():
        class MegatronFinalize(_inprocess().finalize.Finalize):
            def __call__(self, state):
                from megatron.training.training import destroy_global_state

                try:
                    destroy_global_state()
                except Exception:  # noqa: BLE001 - the next call rebuilds all of it
                    logger.exception("[moetion] tearing Megatron's global state down failed")
                return state

        return MegatronFinalize()

    @staticmethod
    def client_store():
        """The Wrapper's store as a client on every rank (``store_host`` hosts it): no rank
        hosts it, so no rank is critical to the job."""
        class ClientTCPStore(_inprocess().store.TCPStore):
            TCP_STORE_HOST_RANK = -1

        return ClientTCPStore


def build_wrapper(args, master_port: int):
    """The Wrapper for Megatron's ``--inprocess-*`` arguments (timeouts as Megatron passes
    them), with MoEtion's abort and finalize steps and rank granularity."""
    import torch

    inprocess = _inprocess()
    active = int(args.inprocess_active_world_size)
    layers = [inprocess.rank_assignment.Layer(
        min_ranks=active, max_ranks=active, flag=inprocess.rank_assignment.LayerFlag.RESERVE)]
    if args.inprocess_granularity == "node" and torch.cuda.is_available():
        import socket

        count = torch.cuda.device_count()
        layers.append(inprocess.rank_assignment.Layer(
            min_ranks=count, max_ranks=count, key_or_fn=lambda _: socket.gethostname(),
            flag=inprocess.rank_assignment.LayerFlag.RESERVE))
    stores = (master_port, master_port + APP_STORE_PORT_OFFSET,
              master_port + WRAPPER_STORE_PORT_OFFSET)
    abort = inprocess.Compose(_Hooks.release_peers(stores),
                              inprocess.abort.AbortTorchDistributed())
    health = (inprocess.health_check.CudaHealthCheck(timeout=timedelta(seconds=10))
              if torch.cuda.is_available() else None)

    def seconds(name):
        return timedelta(seconds=float(getattr(args, f"inprocess_{name}")))

    store = {"store_factory": _Hooks.client_store()} if external_stores() else {}
    return inprocess.Wrapper(
        **store, store_kwargs={"timeout": timedelta(seconds=300),
                               "port": master_port + WRAPPER_STORE_PORT_OFFSET},
        initialize=inprocess.initialize.RetryController(
            min_world_size=active, max_iterations=getattr(args, "inprocess_max_iterations", None)),
        abort=abort, finalize=_Hooks.finalize(), health_check=health,
        rank_assignment=inprocess.rank_assignment.Tree(layers=layers),
        heartbeat_interval=seconds("heartbeat_interval"),
        heartbeat_timeout=seconds("heartbeat_timeout"),
        barrier_timeout=seconds("barrier_timeout"),
        completion_timeout=seconds("completion_timeout"),
        monitor_process_interval=seconds("monitor_process_interval"),
        monitor_thread_interval=seconds("monitor_thread_interval"),
        progress_watchdog_interval=seconds("progress_watchdog_interval"),
        last_call_wait=seconds("last_call_wait"), soft_timeout=seconds("soft_timeout"),
        hard_timeout=seconds("hard_timeout"),
        termination_grace_time=seconds("termination_grace_time"), enabled=True)


class _Generations:
    """The kept-state handover between two calls of the wrapped function (one process)."""

    def __init__(self, runtime: Runtime, app_store, fresh_module_state: dict):
        self.runtime, self.app_store, self.fresh = runtime, app_store, fresh_module_state

    def enter(self, call_wrapper) -> None:
        """At the start of call ``iteration`` > 0: suspend what this rank kept, agree with
        every rank where to resume, and set the runtime up for it (or fall back)."""
        t0 = time.monotonic()
        iteration, state = call_wrapper.iteration, call_wrapper.state
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        restore_module_state(self.fresh)
        session = self.runtime.session
        kept = self.runtime.suspend_session() if session is not None else None
        key = f"moetion/nvrx/gen{iteration}/handoff/"
        self.app_store.set(key + str(rank), json.dumps(
            {"resume": kept, "initial_rank": state.initial_rank}))
        self.app_store.wait([key + str(r) for r in range(world)],
                            timedelta(seconds=HANDOFF_TIMEOUT_S))
        handoffs = {r: json.loads(self.app_store.get(key + str(r))) for r in range(world)}
        resume, reason = decide_resume(handoffs)
        joined = {r: h["initial_rank"] for r, h in handoffs.items() if h["resume"] is None}
        if session is not None:
            outcome = Outcome.REPLACE_IN_PLACE if resume is not None else \
                session.policy.fallback()
            report = session.policy.report(
                cause="process_failure", outcome=outcome, failed=sorted(joined),
                fault_iteration=session.iteration,
                reason=f"restart {iteration} of --inprocess-restart",
                fallback_reason=reason or None, generation=iteration, engine="nvrx",
                replaced_by={str(r): i for r, i in joined.items()},
                seconds_to_decision=time.monotonic() - t0)
            session.policy.metrics.write({"rank": rank, **report})
            if resume is None:
                if rank == min(r for r, h in handoffs.items() if h["resume"] is not None):
                    session.policy.record(report)
                session.policy.exit(outcome, f"rank {rank}: {reason}; "
                                             f"{session.policy.describe(outcome)}")
        if resume is None:  # a reserve rank: the survivors decided to fall back
            FailurePolicy.exit(Outcome.RESTART_FROM_CHECKPOINT, f"rank {rank}: {reason}")
        if not resume:
            return  # nobody kept state: a plain restart from --load
        if session is not None:
            self.runtime.resume_next_generation(resume)
        else:
            self.runtime.join_next_generation(resume)


def wrap_pretrain(pretrain):
    """Megatron's ``maybe_wrap_for_inprocess_restart(pretrain)`` with ``--moetion``: returns
    ``(wrapped pretrain, store)`` as Megatron's does, or None where Megatron's own applies (no
    ``--inprocess-restart``, or MoEtion off). The patched ``inprocess_restart.py`` calls it
    first, so ``pretrain_gpt.py`` runs unchanged: launch one process per rank and reserve rank
    with ``RANK`` / ``WORLD_SIZE`` counting both, ``MASTER_ADDR`` / ``MASTER_PORT`` (the
    stores take the two ports after it).

    Megatron parses and validates its arguments once, outside the wrapped ``pretrain()``, from
    ``RANK`` / ``WORLD_SIZE``: they are set to the active world for that (validation checks the
    parallel sizes against it) and back to the launcher's before the Wrapper starts; each call
    then re-sets Megatron's global arguments from the rank and size the Wrapper assigned."""
    from megatron.training.arguments import parse_args

    from megatron_moetion import config

    args = parse_args(ignore_unknown_args=True)
    if not args.inprocess_restart or not config.from_args(args).enabled:
        return None
    launcher = {key: os.environ[key] for key in ("RANK", "WORLD_SIZE")}
    active = int(args.inprocess_active_world_size)
    os.environ.update(RANK=str(int(launcher["RANK"]) % active), WORLD_SIZE=str(active))
    if int(launcher["RANK"]) == 0 and not external_stores():
        logger.warning("[moetion] initial rank 0 hosts the --inprocess-restart stores: its death "
                       "ends the job. To make it replaceable, run python -m "
                       "megatron_moetion.store_host and start every rank with "
                       "MOETION_EXTERNAL_STORES=1")
    runner = _Runner(install(Runtime(restart_engine="nvrx")), args, launcher)
    return runner.wrap(pretrain), runner.app_store


class _Runner:
    """One process's run under the Wrapper (see ``wrap_pretrain``)."""

    def __init__(self, runtime: Runtime, args, launcher: dict):
        import torch.distributed as dist

        self.runtime, self.args, self.launcher = runtime, args, launcher
        self.port = int(os.environ["MASTER_PORT"])
        self.app_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], self.port + APP_STORE_PORT_OFFSET,
            int(launcher["WORLD_SIZE"]),
            is_master=int(launcher["RANK"]) == 0 and not external_stores(),
            timeout=timedelta(seconds=300), wait_for_workers=True, use_libuv=True)
        self.generations = _Generations(runtime, self.app_store, module_state())
        self.first_args = None

    def _megatron_args(self):
        """Megatron's global arguments for this call: the rank and size the Wrapper assigned,
        set up again where a finalize tore them down (a reserve rank runs the finalize of
        every restart too, before its first call)."""
        from megatron.training import get_args
        from megatron.training.global_vars import set_global_variables

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        try:
            args = get_args()
        except AssertionError:
            args = copy.deepcopy(self.first_args)
            args.rank, args.world_size = rank, world
            set_global_variables(args)
            return args
        args.rank, args.world_size = rank, world
        return args

    def wrap(self, pretrain):
        import torch.distributed as dist

        inprocess = _inprocess()

        def train(*args, call_wrapper=None, **kwargs):
            if call_wrapper.iteration > 0:
                self.generations.enter(call_wrapper)
            self.runtime.prepare_arguments(self._megatron_args())
            kwargs["store"] = dist.PrefixStore(f"moetion/gen{call_wrapper.iteration}",
                                               self.app_store)
            return pretrain(*args, **kwargs)

        # the Wrapper hands its CallWrapper to a parameter annotated exactly so
        train.__annotations__["call_wrapper"] = typing.Optional[inprocess.CallWrapper]  # noqa: UP045
        wrapped = build_wrapper(self.args, self.port)(train)

        def run(*args, **kwargs):
            from megatron.training import get_args

            self.first_args = copy.deepcopy(get_args())  # as the caller parsed them
            os.environ.update(self.launcher)  # the Wrapper counts the reserve ranks
            try:
                return wrapped(*args, **kwargs)
            except (inprocess.exception.RestartAbort,
                    inprocess.rank_assignment.RankDiscarded) as exc:
                _no_reserve_left(self.runtime, self.app_store, exc)

        return run


def _no_reserve_left(runtime: Runtime, app_store, exc: BaseException) -> None:
    """The Wrapper gave up (no reserve rank left to fill the active world): the policy's
    fallback, with one line saying what died and what would have saved the run."""
    session = runtime.session or runtime.suspended
    if session is None:
        raise exc
    policy = session.policy
    outcome = policy.fallback()
    report = policy.report(cause="process_failure", outcome=outcome, failed=[],
                           fault_iteration=session.iteration, reason=str(exc),
                           fallback_reason="no reserve rank left (--inprocess-active-world-size"
                                           " plus reserves)", engine="nvrx")
    policy.metrics.write({"rank": policy.rank, **report})
    try:  # the first rank here records it for the restarted job (rank 0 may be the dead one)
        first = app_store.add(f"moetion/nvrx/no_reserve_left/{session.iteration}", 1) == 1
    except Exception:  # noqa: BLE001 - the store went with its host: nobody can record it
        first = False
    if first:
        policy.record(report)
    extra = "" if outcome is Outcome.RESTART_FROM_CHECKPOINT else (
        "; more reserve ranks or a persistent checkpoint (--save, --save-interval) would have "
        "saved it")
    policy.exit(outcome, f"rank {policy.rank}: a rank died and no reserve rank is left to take "
                         f"its place; {policy.describe(outcome)}{extra}")
