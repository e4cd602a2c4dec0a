"""The paper's reported ETTRs, and our ETTR table (from independent inputs) beside them.

``ettr_table`` simulates and evaluates each scheme at several MTBFs with inputs derived by
``ettr_inputs.derive_inputs`` (FLOPs, bytes, bandwidths; none solved from the paper's results),
puts the paper's values beside ours and explains every cell more than 0.03 away. Measured costs
(from the benchmark) override the derived ones through ``apply_measured``. The paper's numbers
(``paper_reported``, ``PAPER_STATED``) appear only in the comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from megatron_moetion.bench.ettr import Scheme, simulate
from megatron_moetion.bench.ettr_inputs import EttrInputs, derive_inputs
from megatron_moetion.bench.presets import DEEPSEEK_MOE_16B, DEEPSEEK_V3

RUN_S = 12 * 3600.0  # PAPER.md 6.1: 12-hour training runs
PAPER_16B = DEEPSEEK_MOE_16B.model.name
PAPER_671B = DEEPSEEK_V3.model.name
# What the paper states about its inputs (DeepSeek-16.4B, MTBF 10 min unless noted); used only
# beside ours. Recovery totals are over the 12-hour run (PAPER.md 6.2 [I]), ~72 failures.
PAPER_STATED = {
    "window": ("3", "inferred from +17.2% host memory ~ (W - 1)/12 (PAPER.md 6.7 [I])"),
    "moetion_overhead": ("<= 2%", "Table 3 (PAPER.md 6.2)"),
    "gemini_overhead": ("11-15%", "authors' README (PAPER.md 1.2)"),
    "moc_overhead": ("up to 470%", "Table 3 (PAPER.md 6.2)"),
    "gemini_every_iter": ("2.5x slower", "Fig 1a (PAPER.md 1.2)"),
    "moetion_recovery": ("117-241 s total, 1.6-3.3 s/failure", "Table 3 (PAPER.md 6.2)"),
    "gemini_recovery": ("3236-4627 s total, 45-64 s/failure", "Table 3 (PAPER.md 6.2)"),
    "checkfreq_recovery": ("9402-13086 s total, 131-182 s/failure", "Table 3 (PAPER.md 6.2)"),
}


def apply_measured(schemes: dict[str, Scheme], measured: dict | None) -> dict[str, Scheme]:
    """Override scheme parameters with measurements.

    ``measured`` keys (all optional): ``t_iter_s`` (float, every scheme); ``window`` (int,
    MoEtion's W); ``stall_s`` ({scheme: seconds} a checkpoint adds to the iteration taking it:
    MoEtion per iteration, Gemini/CheckFreq per dense checkpoint, MoC for 100% of the
    experts); ``recovery_s`` ({scheme: fixed seconds per failure}: detection, restart, load;
    replay and lost work are still modelled). A measured t_iter or stall lets Young/Daly re-pick
    the dense schemes' interval.

    Raises:
        ValueError: an unknown key or scheme name.
    """
    if not measured:
        return dict(schemes)
    unknown = set(measured) - {"t_iter_s", "window", "stall_s", "recovery_s"}
    if unknown:
        raise ValueError(f"unknown measured keys {sorted(unknown)}; expected t_iter_s, window, "
                         "stall_s, recovery_s")
    stall_field = {"moetion": "stall_s", "gemini": "ckpt_stall_s", "checkfreq": "ckpt_stall_s",
                   "moc": "full_stall_s"}
    rec_field = {"moetion": "fixed_recovery_s", "gemini": "load_s", "checkfreq": "load_s",
                 "moc": "load_s"}
    out = {}
    for name, s in schemes.items():
        changes: dict = {}
        if "t_iter_s" in measured:
            changes["t_iter_s"] = float(measured["t_iter_s"])
        if "window" in measured and name == "moetion":
            changes["window_iters"] = int(measured["window"])
        for key, fields in (("stall_s", stall_field), ("recovery_s", rec_field)):
            per = measured.get(key, {})
            bad = set(per) - set(stall_field)
            if bad:
                raise ValueError(f"measured[{key!r}] has unknown schemes {sorted(bad)}")
            if name in per:
                changes[fields[name]] = float(per[name])
        if name in ("gemini", "checkfreq") and ("t_iter_s" in changes or "ckpt_stall_s"
                                                in changes):
            changes["interval_iters"] = None
        out[name] = replace(s, **changes)
    return out


# --- Comparison with the paper ---------------------------------------------------------------
@dataclass(frozen=True)
class PaperValue:
    """An ETTR the paper reports for ``model``. ``kind``: "value", "range", "at most" or
    "as low as" (the paper's worst case, compared as a value)."""

    scheme: str
    mtbf_s: float
    lo: float
    hi: float
    kind: str
    source: str
    model: str = PAPER_16B

    def distance(self, x: float) -> float:
        """How far ``x`` is outside what the paper reports (0 inside)."""
        if self.kind == "at most":
            return max(0.0, x - self.hi)
        return max(0.0, self.lo - x, x - self.hi)

    def label(self) -> str:
        v = f"{self.lo:.3g}" if self.lo == self.hi else f"{self.lo:.3g}-{self.hi:.3g}"
        return {"at most": f"<= {v}", "as low as": f"as low as {v}"}.get(self.kind, v)


def paper_reported(model: str = PAPER_16B) -> list[PaperValue]:
    """The paper's ETTRs for ``model``: DeepSeek-16.4B (PAPER.md 1.2, 6.2, 6.8) or the 671B
    of its simulator (PAPER.md 6.4), compared with our DeepSeek-V3 preset; [] otherwise."""
    t3, f1b = "Table 3 (PAPER.md 6.2)", "Fig 1b (PAPER.md 1.2)"
    t7 = "Table 7, all precisions and MTBFs (PAPER.md 6.8)"
    f11 = "Fig 11, simulator, DeepSeek-MoE scaled to 671B (PAPER.md 6.4)"
    values = [
        PaperValue("moetion", 600, 0.951, 0.964, "range", t3),
        *(PaperValue("moetion", m, 0.94, 0.98, "range", t7) for m in (7200, 3600, 1800, 600)),
        PaperValue("gemini", 7200, 0.93, 0.93, "value", f1b),
        PaperValue("gemini", 1800, 0.79, 0.79, "at most", f1b),
        PaperValue("gemini", 600, 0.728, 0.728, "value", t3),
        PaperValue("gemini", 600, 0.76, 0.76, "value", "authors' README (PAPER.md 1.2)"),
        PaperValue("gemini", 600, 0.47, 0.47, "value", f1b),
        PaperValue("checkfreq", 600, 0.672, 0.672, "value", t3),
        PaperValue("moc", 600, 0.134, 0.134, "as low as", t3),
        PaperValue("moetion", 600, 0.86, 0.86, "value", f11, PAPER_671B),
        PaperValue("gemini", 600, 0.55, 0.55, "value", f11, PAPER_671B),
    ]
    return [v for v in values if v.model == model]


@dataclass(frozen=True)
class EttrRow:
    """One scheme at one MTBF: mean over the simulated runs, the analytic model, and the
    analytic model without detection and restart (``analytic_bare``, the recovery the paper's
    totals count)."""

    scheme: str
    mtbf_s: float
    simulated: float
    analytic: float
    interval_iters: int
    failures_per_run: float
    restarted_fraction: float  # of failures that hit a recovery in progress
    recovery_per_failure_s: float
    stall_fraction: float
    tokens_lost_fraction: float
    paper: tuple[PaperValue, ...] = ()
    preset: str = PAPER_16B
    analytic_bare: float = float("nan")


@dataclass(frozen=True)
class EttrTable:
    rows: tuple[EttrRow, ...]
    markdown: str
    explanations: tuple[str, ...]


_WHY_FIG1B = ("Fig 1b and Table 3 disagree by 0.26 at the same MTBF and model (0.47 vs 0.728), "
              "so Fig 1b's Gemini is another configuration (e.g. an interval not re-tuned per "
              "MTBF) that the stated numbers do not pin down")
_WHY_671B = ("the paper's 671B is DeepSeek-MoE scaled up in its simulator on 512-16,384 GPUs "
             "with up to 64 pipeline stages on its own network (PAPER.md 6.4; layout and "
             "bandwidths not visible), ours DeepSeek-V3's published layout (2048 H800, PP16 "
             "EP64, 400 Gbps per GPU)")


def _why(row: EttrRow, pv: PaperValue, inputs: EttrInputs | None, ours: float) -> str:
    if pv.model == PAPER_671B:
        if inputs is None or row.scheme != "gemini":
            return _WHY_671B
        return (f"{_WHY_671B}; on ours Gemini's replication to r peers takes "
                f"{inputs['gemini_transfer_s']:.2f} s per checkpoint, under one iteration "
                f"({inputs['t_iter_s']:.1f} s), so it checkpoints every "
                f"{row.interval_iters} iteration(s) at no stall")
    if pv.scheme == "gemini" and pv.lo < 0.5:
        return _WHY_FIG1B
    if inputs is None:
        return "our inputs are measured here, the paper's on its cluster"
    i = inputs
    if row.scheme == "moetion":
        return (f"we add per failure detection and restart and a buddy fetch "
                f"({i['moetion_fixed_s']:.0f} s in all, {i.values['moetion_fixed_s'].source}) "
                f"that the paper's 117-241 s recovery totals (1.6-3.3 s per failure) leave out; "
                f"without detection and restart the analytic ETTR is {row.analytic_bare:.3f}")
    if row.scheme in ("gemini", "checkfreq"):
        link = "replication to its peers" if row.scheme == "gemini" else "persist to storage"
        t = i[f"{row.scheme}_transfer_s"]
        lower = ours < pv.lo
        return ((f"ours is lower: we add detection and restart per failure (analytic "
                 f"{row.analytic_bare:.3f} without them); " if lower else "")
                + f"from bytes, the {link} ({t:.1f} s) fits in an interval of "
                f"{row.interval_iters} iterations and a failure costs half an interval plus "
                f"{i[f'{row.scheme}_load_s']:.0f} s (detection, restart, reload); the paper's "
                "stated overhead and recovery exceed bytes over the stated links (not modelled: "
                "checkpoint traffic contending with training, a blocking snapshot)")
    return (f"MoC's stall ({row.stall_fraction:.0%} of useful time here) is its snapshot "
            "persisted over the storage link every iteration, linear in the expert fraction, "
            "which doubles every 8 failures (assumed); 'as low as' is the paper's worst case "
            "while we report a mean")


def _explain(row: EttrRow, pv: PaperValue, which: str, ours: float, inputs: EttrInputs | None,
             useful: float, total: float, failures: float) -> str:
    why = _why(row, pv, inputs, ours)
    if ours < pv.lo and which == "simulated" and row.restarted_fraction > 0.05:
        why += (f"; the simulator also restarts recoveries hit by another failure "
                f"({row.restarted_fraction:.0%} of failures here)")
    text = (f"{row.scheme} at MTBF {row.mtbf_s / 60:.0f} min: {which} {ours:.3f} vs paper "
            f"{pv.label()} ({pv.source}): {why}")
    if ours > pv.hi and failures > 0 and which == "simulated":
        extra = (useful / pv.hi - total) / failures
        text += f"; matching it would take {extra:.0f} s more lost per failure"
    return text + "."


def ettr_table(mtbfs_s: Iterable[float] = (7200, 3600, 1800, 600),
               measured: dict | None = None, *, inputs: EttrInputs | None = None,
               num_runs: int = 10, run_s: float = RUN_S, seed: int = 0) -> EttrTable:
    """Simulated (``num_runs`` runs of ``run_s`` seconds each, seeds ``seed``...) and analytic
    ETTR per scheme and MTBF for ``inputs`` (default: ``derive_inputs`` of DeepSeek-16.4B),
    overridden by ``measured`` (see ``apply_measured``), with the paper's values for that model
    and an explanation for every cell more than 0.03 away from them."""
    if inputs is None:
        inputs = derive_inputs(DEEPSEEK_MOE_16B)
    bare = replace(inputs, values=inputs.values | {
        k: replace(inputs.values[k], value=inputs[k] - inputs.detect_restart_s)
        for k in ("moetion_fixed_s", "gemini_load_s", "checkfreq_load_s", "moc_load_s")})
    reported = paper_reported(inputs.preset)
    rows: list[EttrRow] = []
    notes: list[str] = []
    for m in mtbfs_s:
        schemes = apply_measured(inputs.schemes(m), measured)
        bare_schemes = apply_measured(bare.schemes(m), measured)
        for name, s in schemes.items():
            res = [simulate(s, total_time_s=run_s, mtbf_s=m, seed=seed + i)
                   for i in range(num_runs)]
            useful = sum(r.useful_s for r in res)
            total = sum(r.total_s for r in res)
            fails = sum(r.num_failures for r in res)
            row = EttrRow(
                scheme=name, mtbf_s=m, simulated=useful / total, analytic=s.analytic(m),
                interval_iters=res[0].interval_iters, failures_per_run=fails / num_runs,
                restarted_fraction=sum(r.restarts for r in res) / max(fails, 1),
                recovery_per_failure_s=sum(r.recovery_s for r in res) / max(fails, 1),
                stall_fraction=sum(r.stall_s for r in res) / useful,
                tokens_lost_fraction=sum(r.tokens_lost_iters for r in res)
                / max(sum(r.iterations for r in res), 1),
                paper=tuple(p for p in reported if p.scheme == name and p.mtbf_s == m),
                preset=inputs.preset, analytic_bare=bare_schemes[name].analytic(m))
            rows.append(row)
            for pv in row.paper:
                for which, ours in (("simulated", row.simulated), ("analytic", row.analytic)):
                    if pv.distance(ours) > 0.03:
                        notes.append(_explain(row, pv, which, ours,
                                              None if measured else inputs, useful, total,
                                              fails))
    order = {n: k for k, n in enumerate(("moetion", "gemini", "checkfreq", "moc"))}
    rows.sort(key=lambda r: (order.get(r.scheme, 9), -r.mtbf_s))
    return EttrTable(tuple(rows), format_ettr_markdown(rows), tuple(notes))


def format_ettr_markdown(rows: Iterable[EttrRow]) -> str:
    """Markdown: ours (simulated, analytic, analytic without detection/restart) next to the
    paper's value and its source."""
    lines = ["| scheme | MTBF (min) | simulated | analytic | analytic, no detect/restart "
             "| interval (iters) | stall/iter | recovery/failure (s) | tokens lost | paper "
             "| paper source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "; ".join(p.label() for p in r.paper) or "-"
        src = "; ".join(p.source for p in r.paper) or "-"
        lost = f"{r.tokens_lost_fraction:.2%}" if r.tokens_lost_fraction else "-"
        lines.append(f"| {r.scheme} | {r.mtbf_s / 60:.0f} | {r.simulated:.3f} | "
                     f"{r.analytic:.3f} | {r.analytic_bare:.3f} | {r.interval_iters} | "
                     f"{r.stall_fraction:.1%} | {r.recovery_per_failure_s:.1f} | {lost} | "
                     f"{paper} | {src} |")
    return "\n".join(lines)
