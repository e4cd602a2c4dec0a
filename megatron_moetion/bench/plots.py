"""PNG plots for benchmark reports: ETTR against MTBF, stall per iteration, recovery phases.

Every function takes plain data (``ettr_paper.EttrRow`` objects or dicts with the same keys, or
dicts of numbers), tolerates missing or partial data (a missing value is skipped or shown as
"n/a"; no data at all gives a figure saying so), writes one PNG and returns its path. It uses
matplotlib's object API with the Agg canvas, so it never touches pyplot's global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = {"moetion": "tab:green", "gemini": "tab:blue", "checkfreq": "tab:orange",
           "moc": "tab:red"}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _color(scheme: str, i: int) -> str:
    return _COLORS.get(scheme, f"C{i % 10}")


def plot_ettr_vs_mtbf(rows: Iterable[Any], path: str | os.PathLike[str]) -> Path:
    """ETTR against MTBF (minutes, log axis) per scheme: simulated (solid), analytic (dashed),
    the paper's values as markers (a range as an error bar, "at most" as a down triangle).

    Args:
        rows: ``EttrRow``-like items with ``scheme``, ``mtbf_s`` and any of ``simulated``,
            ``analytic`` and ``paper`` (items with ``lo``, ``hi``, ``kind``).
        path: PNG to write.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    by_scheme: dict[str, list[Any]] = {}
    for r in rows:
        if _num(_get(r, "mtbf_s")) and _num(_get(r, "mtbf_s")) > 0:
            by_scheme.setdefault(str(_get(r, "scheme", "?")), []).append(r)
    if not by_scheme:
        _no_data(ax)
        return _save(fig, path)
    xs_all = set()
    for i, (scheme, items) in enumerate(by_scheme.items()):
        color = _color(scheme, i)
        items = sorted(items, key=lambda r: float(_get(r, "mtbf_s")))
        for key, style, label in (("simulated", "-o", "simulated"), ("analytic", "--", "analytic")):
            pts = [(float(_get(r, "mtbf_s")) / 60, _num(_get(r, key))) for r in items]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{scheme} {label}")
                xs_all.update(x for x, _ in pts)
        first = True
        for r in items:
            x = float(_get(r, "mtbf_s")) / 60
            for pv in _get(r, "paper", ()) or ():
                lo, hi = _num(_get(pv, "lo")), _num(_get(pv, "hi"))
                if lo is None and hi is None:
                    continue
                lo, hi = (lo if lo is not None else hi), (hi if hi is not None else lo)
                marker = "v" if _get(pv, "kind") == "at most" else "x"
                ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2], [(hi - lo) / 2]],
                            fmt=marker, color=color, markersize=8, capsize=3,
                            label=f"{scheme} paper" if first else None)
                first = False
                xs_all.add(x)
    ax.set_xscale("log")
    ticks = sorted(xs_all)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("MTBF (minutes, log scale)")
    ax.set_ylabel("ETTR")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="lower right")
    return _save(fig, path)


def plot_stall_per_iteration(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar chart of snapshot stall per iteration in ms, one bar per scheme ("n/a" if missing).

    Args:
        data: scheme -> milliseconds (None or NaN for not measured).
        path: PNG to write.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    names = list(data or {})
    if not names:
        _no_data(ax)
        return _save(fig, path)
    values = [_num(data[n]) for n in names]
    bars = ax.bar(range(len(names)), [v or 0.0 for v in values],
                  color=[_color(n, i) for i, n in enumerate(names)])
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("stall per iteration (ms)")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_recovery_phases(data: Mapping[str, Mapping[str, Any] | None],
                         path: str | os.PathLike[str]) -> Path:
    """Stacked horizontal bars: one bar per scheme (or per recovery), one segment per phase.

    Args:
        data: label -> {phase: seconds}; missing phases and None/NaN count as 0.
        path: PNG to write.
    """
    labels = list(data or {})
    fig = _new_figure(width=8.0, height=max(2.5, 1.0 + 0.5 * len(labels)))
    ax = fig.add_subplot()
    phases: list[str] = []
    for lab in labels:
        for ph in data[lab] or {}:
            if ph not in phases:
                phases.append(ph)
    if not labels or not phases:
        _no_data(ax)
        return _save(fig, path)
    left = [0.0] * len(labels)
    for i, ph in enumerate(phases):
        widths = [_num((data[lab] or {}).get(ph)) or 0.0 for lab in labels]
        ax.barh(range(len(labels)), widths, left=left, label=ph, color=f"C{i % 10}")
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.annotate(f"{total:.1f} s", (total, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize="small")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(max(left), 1e-9) * 1.15)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
