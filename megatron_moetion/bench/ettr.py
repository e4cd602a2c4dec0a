"""ETTR: the paper's analytic model and a discrete-event failure simulator (pure).

ETTR (effective training time ratio) is useful training time over wall-clock time. The
analytic model is PAPER.md 1.4. ``simulate`` plays a run against failure times (exponential
with a given MTBF from a seeded ``random.Random``, or a trace file) for four schemes: MoEtion,
Gemini, CheckFreq and MoC-System. A failure discards the iteration in flight and starts a
recovery; a failure during recovery restarts it. ``ettr_inputs`` derives the inputs per
preset and ``ettr_paper`` compares the results with the paper's numbers.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar


def ettr_analytic(t_iter: float, t_ckpt: float, ckpt_interval_iters: float,
                  expected_recovery_s: float, mtbf_s: float) -> float:
    """PAPER.md 1.4: 1/(1 + T_ckpt/(T_iter*interval)) * 1/(1 + E[R]/MTBF)."""
    for name, v in (("t_iter", t_iter), ("ckpt_interval_iters", ckpt_interval_iters),
                    ("mtbf_s", mtbf_s)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    return (1.0 / (1.0 + t_ckpt / (t_iter * ckpt_interval_iters))
            / (1.0 + expected_recovery_s / mtbf_s))


def expected_recovery_dense(t_iter: float, interval_iters: float, load_s: float = 0.0) -> float:
    """Dense periodic checkpointing (Daly 2006): half an interval of lost work plus restart/load."""
    return 0.5 * interval_iters * t_iter + load_s


def expected_recovery_moetion(t_iter: float, window_iters: int, overhead_s: float = 0.0) -> float:
    """MoEtion (PAPER.md 1.4, paper 3.6): 1.5 * W * T_iter plus optional detection/load time."""
    return 1.5 * window_iters * t_iter + overhead_s


def young_daly_interval(t_ckpt: float, mtbf_s: float, t_iter: float) -> float:
    """Young/Daly optimum sqrt(2 * T_ckpt * MTBF) / T_iter iterations, at least 1."""
    return max(1.0, math.sqrt(2.0 * t_ckpt * mtbf_s) / t_iter)


CONVERSION_SAVING = 0.33  # PAPER.md 3.2/6.5, Fig 13: frozen operators skip wgrad and optimizer
LOCALIZED_SAVING = 0.23  # PAPER.md 4.2, Fig 9b: replaying one stage avoids pipeline bubbles


def _positive(obj: object, *names: str, strict: bool = True) -> None:
    for name in names:
        v = getattr(obj, name)
        if not (v > 0 if strict else v >= 0):
            raise ValueError(f"{type(obj).__name__}.{name} must be {'>' if strict else '>='} 0, "
                             f"got {v!r}")


@dataclass(frozen=True)
class MoEtionScheme:
    """Sparse snapshot every iteration, window W, localized replay after a failure.

    Recovery replays from the last persisted window (windows restart after each recovery):
    (W - 1) conversion iterations, which cost ``1 - conversion_saving``, then catch-up to the
    failed iteration, all at ``1 - localized_saving`` of an iteration, plus ``fixed_recovery_s``.

    Attributes:
        t_iter_s: iteration time (not stated by the paper; derived in ``ettr_inputs``).
        stall_s: snapshot stall added to every iteration (PAPER.md 6.2, Table 3: <= 2%).
        window_iters: W (PAPER.md 6.7, Table 6: +17.2% host memory ~ (W - 1)/12, so W = 3).
        fixed_recovery_s: detection, restart and buddy fetch per failure (default 0;
            ``ettr_inputs`` derives it).
        conversion_saving: conversion replay saving, frozen operators skip wgrad and optimizer
            (PAPER.md 3.2/6.5, Fig 13: ~33%).
        localized_saving: replay saving of upstream logging, no pipeline bubbles (PAPER.md
            4.2, Fig 9b: 23%).
    """

    name: ClassVar[str] = "moetion"
    t_iter_s: float
    stall_s: float
    window_iters: int
    fixed_recovery_s: float = 0.0
    conversion_saving: float = CONVERSION_SAVING
    localized_saving: float = LOCALIZED_SAVING

    def __post_init__(self) -> None:
        _positive(self, "t_iter_s", "window_iters")
        _positive(self, "stall_s", "fixed_recovery_s", strict=False)
        for n in ("conversion_saving", "localized_saving"):
            if not 0 <= getattr(self, n) < 1:
                raise ValueError(f"MoEtionScheme.{n} must be in [0, 1), got {getattr(self, n)}")

    def analytic(self, mtbf_s: float) -> float:
        er = expected_recovery_moetion(self.t_iter_s, self.window_iters, self.fixed_recovery_s)
        return ettr_analytic(self.t_iter_s, self.stall_s, 1, er, mtbf_s)

    def _start(self, mtbf_s: float | None) -> _Run:
        return _MoEtionRun(self)


@dataclass(frozen=True)
class GeminiScheme:
    """Dense in-memory checkpoint every k iterations (Gemini, SOSP'23); global rollback.

    Attributes:
        t_iter_s: iteration time (the same model as MoEtion's; derived in ``ettr_inputs``).
        ckpt_stall_s: stall of one dense checkpoint (derived from bytes and bandwidths in
            ``ettr_inputs``).
        load_s: per-failure detection, restart and load seconds (``ettr_inputs``).
        interval_iters: k; None picks it by Young/Daly from ``ckpt_stall_s`` and the MTBF
            (the paper's "optimal policy", method not stated, PAPER.md 1.4).
    """

    name: ClassVar[str] = "gemini"
    t_iter_s: float
    ckpt_stall_s: float
    load_s: float = 0.0
    interval_iters: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "t_iter_s")
        _positive(self, "ckpt_stall_s", "load_s", strict=False)
        if self.interval_iters is not None and self.interval_iters < 1:
            raise ValueError(f"{type(self).__name__}.interval_iters must be >= 1 or None, "
                             f"got {self.interval_iters}")

    def interval(self, mtbf_s: float | None) -> int:
        if self.interval_iters is not None:
            return self.interval_iters
        if mtbf_s is None:
            raise ValueError(f"{type(self).__name__}.interval_iters is None: pass mtbf_s")
        return max(1, round(young_daly_interval(self.ckpt_stall_s, mtbf_s, self.t_iter_s)))

    def analytic(self, mtbf_s: float) -> float:
        k = self.interval(mtbf_s)
        er = expected_recovery_dense(self.t_iter_s, k, self.load_s)
        return ettr_analytic(self.t_iter_s, self.ckpt_stall_s, k, er, mtbf_s)

    def _start(self, mtbf_s: float | None) -> _Run:
        return _Run(self.t_iter_s, self.ckpt_stall_s, self.interval(mtbf_s), self.load_s)


@dataclass(frozen=True)
class CheckFreqScheme(GeminiScheme):
    """Like Gemini, but every checkpoint is persisted to remote storage (CheckFreq, FAST'21):
    a larger stall (the persist) and a slower load (from storage).

    Attributes: as ``GeminiScheme``, except ``ckpt_stall_s`` and ``load_s``, both derived in
    ``ettr_inputs`` from the dense state over the 40 Gbps storage link (PAPER.md 6.1).
    """

    name: ClassVar[str] = "checkfreq"


@dataclass(frozen=True)
class MoCScheme:
    """MoC-System partial expert checkpointing (ASPLOS'25): checkpoint ``fraction`` of the
    experts every ``interval_iters``; recovery is fast but experts revert to their last
    snapshot, losing on average (1/fraction - 1)/2 iterations' worth of expert updates.

    Attributes:
        t_iter_s: iteration time (the same model as MoEtion's; derived in ``ettr_inputs``).
        full_stall_s: stall of a checkpoint of 100% of the experts; the stall is linear in the
            fraction (assumed; PAPER.md 6.2, Table 3: up to 470% overhead at MTBF 10 min, taken
            as 100%; PAPER.md 6.3, Fig 10: goodput -71% from 12.5% to 100%, and
            (1 + 0.125 * 4.7)/(1 + 4.7) = 0.28 agrees).
        fraction: initial expert fraction per checkpoint (PAPER.md 6.1: 12.5%).
        load_s: per-failure restart and load seconds (assumed: as Gemini, in-memory first level).
        interval_iters: iterations between partial checkpoints (assumed 1).
        doubling_failures: double the fraction (up to 1) every this many failures as the
            lost-token budget runs out; None keeps it fixed (assumed 8: 12.5% -> 100% over the
            24 failures of the paper's Fig 10 trace).
    """

    name: ClassVar[str] = "moc"
    t_iter_s: float
    full_stall_s: float
    fraction: float = 0.125
    load_s: float = 0.0
    interval_iters: int = 1
    doubling_failures: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "t_iter_s", "interval_iters")
        _positive(self, "full_stall_s", "load_s", strict=False)
        if not 0 < self.fraction <= 1:
            raise ValueError(f"MoCScheme.fraction must be in (0, 1], got {self.fraction}")
        if self.doubling_failures is not None and self.doubling_failures < 1:
            raise ValueError(f"MoCScheme.doubling_failures must be >= 1 or None, "
                             f"got {self.doubling_failures}")

    def analytic(self, mtbf_s: float) -> float:
        """At the initial fraction (the analytic model cannot follow the fraction's growth)."""
        er = expected_recovery_dense(self.t_iter_s, self.interval_iters, self.load_s)
        return ettr_analytic(self.t_iter_s, self.full_stall_s * self.fraction,
                             self.interval_iters, er, mtbf_s)

    def _start(self, mtbf_s: float | None) -> _Run:
        return _MoCRun(self)


Scheme = MoEtionScheme | GeminiScheme | CheckFreqScheme | MoCScheme


class _Run:
    """Simulation state of a periodic-checkpoint scheme: ``stall_s`` after every iteration
    whose 1-based index is a multiple of ``interval``; rollback to the last such iteration."""

    def __init__(self, t_iter: float, stall_s: float, interval: int, load_s: float):
        self.t_iter, self.stall_s, self.interval, self.load_s = t_iter, stall_s, interval, load_s
        self.lost_token_iters = 0.0

    def cum(self, n: int, m: int) -> float:
        """Seconds to run iterations n+1..m, stalls included."""
        return (m - n) * self.t_iter + self.stall_s * (m // self.interval - n // self.interval)

    def on_failure(self, n: int) -> float:
        """Recovery seconds after a failure with ``n`` iterations complete."""
        return self.load_s + (n % self.interval) * self.t_iter


class _MoEtionRun(_Run):
    def __init__(self, s: MoEtionScheme):
        super().__init__(s.t_iter_s, s.stall_s, 1, s.fixed_recovery_s)
        self.s = s
        self.epoch = 0  # windows start after the last recovery point
        self.anchor, self.conversion = 0, 0  # iteration 0: a dense initial state, no conversion

    def on_failure(self, n: int) -> float:
        w = self.s.window_iters
        if n - self.epoch >= w:  # a window completed (and persisted) since the last recovery
            self.anchor, self.conversion = self.epoch + (n - self.epoch) // w * w, w - 1
        self.epoch = n
        replay = self.conversion * (1 - self.s.conversion_saving) + (n - self.anchor)
        return self.load_s + replay * (1 - self.s.localized_saving) * self.t_iter


class _MoCRun(_Run):
    def __init__(self, s: MoCScheme):
        super().__init__(s.t_iter_s, s.full_stall_s * s.fraction, s.interval_iters, s.load_s)
        self.s, self.fraction, self.failures, self.last_n = s, s.fraction, 0, -1

    def on_failure(self, n: int) -> float:
        if n != self.last_n:  # a failure during recovery loses nothing new
            self.lost_token_iters += (1 / self.fraction - 1) / 2
            self.last_n = n
        self.failures += 1
        d = self.s.doubling_failures
        if d and self.failures % d == 0:
            self.fraction = min(1.0, 2 * self.fraction)
            self.stall_s = self.s.full_stall_s * self.fraction
        return super().on_failure(n)


@dataclass(frozen=True)
class SimResult:
    """Where the wall-clock time of one simulated run went (seconds).

    ``recovery_s`` counts the work in flight at each failure, restart/load and replay;
    ``tokens_lost_iters`` is MoC's discarded expert updates in iterations' worth of tokens.
    """

    scheme: str
    useful_s: float
    stall_s: float
    recovery_s: float
    iterations: int
    num_failures: int
    interval_iters: int
    tokens_lost_iters: float = 0.0
    restarts: int = 0  # failures that hit a recovery in progress

    @property
    def total_s(self) -> float:
        return self.useful_s + self.stall_s + self.recovery_s

    @property
    def ettr(self) -> float:
        return self.useful_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def tokens_lost_fraction(self) -> float:
        return self.tokens_lost_iters / self.iterations if self.iterations else 0.0


def exponential_failures(mtbf_s: float, rng: random.Random) -> Iterator[float]:
    """Failure times (s) of a Poisson process with mean gap ``mtbf_s``, forever."""
    if not mtbf_s > 0:
        raise ValueError(f"mtbf_s must be > 0, got {mtbf_s!r}")
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        yield t


def load_failure_trace(path: str | os.PathLike[str]) -> list[float]:
    """Failure times from a file: one timestamp in seconds per line; '#' starts a comment."""
    times = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                t = float(text)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a timestamp: {text!r}") from None
            if not t >= 0:
                raise ValueError(f"{path}:{lineno}: timestamp must be >= 0, got {t}")
            times.append(t)
    return sorted(times)


def simulate(scheme: Scheme, *, total_time_s: float | None = None,
             target_iters: int | None = None,
             failures: Iterable[float] | str | os.PathLike[str] | None = None,
             mtbf_s: float | None = None, seed: int = 0) -> SimResult:
    """Simulate one run.

    Args:
        scheme: the checkpointing scheme.
        total_time_s: stop at this wall-clock time (the last partial iteration is dropped), or
        target_iters: stop when this many iterations are done (exactly one of the two).
        failures: failure times in seconds (ascending), or a trace file path; None draws them
            from an exponential distribution with ``mtbf_s`` (none if ``mtbf_s`` is None).
        mtbf_s: MTBF for drawing failures and for tuning Young/Daly intervals; for a trace
            without it, the mean gap of the trace is used for tuning.
        seed: seed of the ``random.Random`` drawing failures.

    Raises:
        ValueError: both or neither of ``total_time_s`` and ``target_iters``; bad values.
    """
    if (total_time_s is None) == (target_iters is None):
        raise ValueError("pass exactly one of total_time_s and target_iters")
    if isinstance(failures, (str, os.PathLike)):
        failures = load_failure_trace(failures)
        if mtbf_s is None and failures:
            mtbf_s = failures[-1] / len(failures)
    elif failures is None:
        failures = exponential_failures(mtbf_s, random.Random(seed)) if mtbf_s else ()
    run = scheme._start(mtbf_s)
    end = math.inf if total_time_s is None else total_time_s
    cap = math.inf if target_iters is None else target_iters
    stream = iter(failures)
    next_fail = next(stream, math.inf)
    t, n, stall, rec, num_failures, restarts = 0.0, 0, 0.0, 0.0, 0, 0
    while True:
        avail = min(next_fail, end) - t
        lo, hi = n, int(min(n + avail / run.t_iter + 1, cap))
        while lo < hi:  # the most iterations that finish before the next event
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if run.cum(n, mid) <= avail else (lo, mid - 1)
        dt = run.cum(n, lo)
        stall += dt - (lo - n) * run.t_iter
        t, n = t + dt, lo
        if n >= cap or next_fail >= end:
            break
        rec += next_fail - t  # the iteration in flight is lost
        t = next_fail
        while True:  # recover; a failure during recovery restarts it
            num_failures += 1
            cost = run.on_failure(n)
            next_fail = next(stream, math.inf)
            stop = max(t, min(next_fail, end))  # a trace may repeat a timestamp
            if stop >= t + cost:
                rec, t = rec + cost, t + cost
                break
            rec, t = rec + (stop - t), stop
            if stop >= end:
                break
            restarts += 1
        if t >= end:
            break
    return SimResult(scheme.name, n * run.t_iter, stall, rec, n, num_failures, run.interval,
                     run.lost_token_iters, restarts)
