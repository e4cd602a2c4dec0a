"""The ETTR tables over every preset, beside the paper's, and ``docs/performance.md``.

Inputs come from ``ettr_inputs.derive_inputs`` (FLOPs, bytes, bandwidths, each sourced); ETTRs
from ``ettr_paper.ettr_table`` (``ettr.simulate`` and the analytic model) at MTBF 10 min to 2 h.
The paper's numbers appear only in the comparison columns. Run
``python -m megatron_moetion.bench.performance`` to print the tables and write the document.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_moetion.bench import contention
from megatron_moetion.bench.ettr_inputs import (
    DETECT_S,
    MOC_FRACTION,
    RESTART_S,
    EttrInputs,
    derive_inputs,
)
from megatron_moetion.bench.ettr_paper import (
    PAPER_16B,
    PAPER_671B,
    PAPER_STATED,
    EttrTable,
    ettr_table,
)
from megatron_moetion.bench.presets import PRESETS, Preset

MTBFS_S = (600.0, 1800.0, 3600.0, 7200.0)  # PAPER.md 6.1: MTBF swept from 10 min to 2 h
DOC = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def every_iteration_slowdown(i: EttrInputs) -> float:
    """Gemini checkpointing every iteration: (t_iter + stall at k = 1) / t_iter."""
    t = i["t_iter_s"]
    return (t + i["copy_excess_s"] + max(0.0, i["gemini_transfer_s"] - t)) / t


def inputs_markdown(inputs: Iterable[EttrInputs]) -> str:
    """One row per preset: W and every derived input (sources in ``sources_markdown``)."""
    lines = ["| preset | W (binding) | MFU | t_iter (s) | MoEtion stall/iter | MoEtion fixed "
             "s/failure | dense copy beyond fwd+bwd (s) | Gemini replication s/ckpt | Gemini "
             "every iteration | Gemini load s/failure | CheckFreq persist s/ckpt | CheckFreq "
             f"load s/failure | MoC stall/iter at {MOC_FRACTION:.1%} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in inputs:
        t = i["t_iter_s"]
        lines.append(
            f"| {i.preset} | {i.window} ({i.binding}{'' if i.fits else ', stalls'}) | "
            f"{i['mfu']:.3f} | {t:.2f} | {i['moetion_stall_s'] / t:.1%} | "
            f"{i['moetion_fixed_s']:.1f} | {i['copy_excess_s']:.2f} | "
            f"{i['gemini_transfer_s']:.2f} | {every_iteration_slowdown(i):.2f}x | "
            f"{i['gemini_load_s']:.1f} | {i['checkfreq_transfer_s']:.1f} | "
            f"{i['checkfreq_load_s']:.1f} | {i['moc_full_stall_s'] * MOC_FRACTION / t:.0%} |")
    return "\n".join(lines)


def sources_markdown(i: EttrInputs) -> str:
    """Every input of one preset with its value and source."""
    lines = ["| input | value | source |", "|---|---|---|"]
    lines += [f"| {k} | {v.text()} | {v.source} |" for k, v in i.values.items()]
    return "\n".join(lines)


def _row(table: EttrTable, scheme: str, mtbf_s: float):
    return next(r for r in table.rows if r.scheme == scheme and r.mtbf_s == mtbf_s)


def paper_inputs_markdown(i: EttrInputs, table: EttrTable) -> str:
    """DeepSeek-16.4B: our inputs and per-failure recovery beside what the paper states."""
    t = i["t_iter_s"]
    rec = {s: _row(table, s, 600.0).recovery_per_failure_s for s in ("moetion", "gemini",
                                                                      "checkfreq")}
    stall = {s: _row(table, s, 600.0).stall_fraction for s in ("gemini", "moc")}
    rows = [
        ("window W", f"{i.window} ({i.binding})", "window"),
        ("MoEtion overhead per iteration", f"{i['moetion_stall_s'] / t:.1%}",
         "moetion_overhead"),
        ("Gemini overhead at MTBF 10 min", f"{stall['gemini']:.1%}", "gemini_overhead"),
        ("MoC overhead at MTBF 10 min (mean over the run)", f"{stall['moc']:.0%}",
         "moc_overhead"),
        ("Gemini checkpointing every iteration", f"{every_iteration_slowdown(i):.2f}x slower",
         "gemini_every_iter"),
        ("MoEtion recovery per failure, MTBF 10 min", f"{rec['moetion']:.1f} s",
         "moetion_recovery"),
        ("Gemini recovery per failure, MTBF 10 min", f"{rec['gemini']:.1f} s",
         "gemini_recovery"),
        ("CheckFreq recovery per failure, MTBF 10 min", f"{rec['checkfreq']:.1f} s",
         "checkfreq_recovery"),
    ]
    lines = ["| quantity | ours | paper | paper source |", "|---|---|---|---|"]
    lines += [f"| {q} | {ours} | {PAPER_STATED[k][0]} | {PAPER_STATED[k][1]} |"
              for q, ours, k in rows]
    return "\n".join(lines)


def summary_markdown(tables: dict[str, EttrTable]) -> str:
    """Simulated ETTR per preset, scheme and MTBF, with the paper's 10-min value."""
    head = " | ".join(f"{m / 60:.0f} min" for m in MTBFS_S)
    lines = [f"| preset | scheme | {head} | 10 min, no detect/restart (analytic) "
             "| paper, 10 min |", "|---|---|" + "---|" * len(MTBFS_S) + "---|---|"]
    for name, t in tables.items():
        for s in ("moetion", "gemini", "checkfreq", "moc"):
            cells = " | ".join(f"{_row(t, s, m).simulated:.3f}" for m in MTBFS_S)
            r10 = _row(t, s, 600.0)
            paper = "; ".join(p.label() for p in r10.paper) or "-"
            lines.append(f"| {name} | {s} | {cells} | {r10.analytic_bare:.3f} | {paper} |")
    return "\n".join(lines)


def build(presets: Sequence[Preset] | None = None, *, num_runs: int = 10,
          seed: int = 0) -> tuple[dict[str, EttrInputs], dict[str, EttrTable]]:
    """Inputs and ETTR tables for ``presets`` (default: every preset)."""
    presets = list(PRESETS.values()) if presets is None else list(presets)
    inputs = {p.model.name: derive_inputs(p) for p in presets}
    tables = {n: ettr_table(MTBFS_S, inputs=i, num_runs=num_runs, seed=seed)
              for n, i in inputs.items()}
    return inputs, tables


def document(inputs: dict[str, EttrInputs], tables: dict[str, EttrTable],
             num_runs: int) -> str:
    """``docs/performance.md``: inputs with sources, ETTRs beside the paper's, differences,
    and the copy/all-to-all contention model."""
    presets = [p for p in PRESETS.values() if p.model.name in inputs]
    out = [
        "# Performance: ETTR from independent inputs, beside the paper's",
        "",
        "Generated by `python -m megatron_moetion.bench.performance` (do not edit by hand). "
        "Every input below is derived from FLOPs, bytes and bandwidths "
        "(`megatron_moetion/bench/ettr_inputs.py`), each with its source; none is solved from "
        "the paper's ETTRs, recovery totals or overhead percentages, which appear only in the "
        "comparison columns. ETTRs are simulated with `bench.ettr.simulate` "
        f"({num_runs} runs of 12 hours per cell, PAPER.md 6.1) and from the analytic model of "
        "PAPER.md 1.4.",
        "",
        "Cost model: a device-to-host copy overlaps the next fwd+bwd; a transfer off the node "
        "(replication to r = 2 peers, a persist to storage) overlaps training until the next "
        "checkpoint, on a NIC assumed free of training traffic; the dense schemes' interval is "
        "the one maximising PAPER.md 1.4's ETTR (their \"optimal policy\"). Every scheme pays "
        f"detection ({DETECT_S:g} s, `detect_timeout_s` default) and restart ({RESTART_S:g} s, "
        "assumed) per failure; the paper's recovery totals leave these out, so a column "
        "without them is given too.",
        "",
        "## Inputs per preset",
        "",
        inputs_markdown(inputs.values()),
    ]
    if PAPER_16B in inputs:
        out += ["", "## DeepSeek-16.4B: our inputs beside what the paper states", "",
                paper_inputs_markdown(inputs[PAPER_16B], tables[PAPER_16B])]
    out += ["", "## Reading", "",
            "- Detection and restart dominate at a 10-min MTBF: with them every in-memory scheme "
            "lands near 0.86; without them (the paper's recovery totals count replay only) "
            "MoEtion is 0.98 on DeepSeek-16.4B, inside the paper's 0.94-0.98.",
            "- From bytes alone the dense in-memory baseline is cheap: Gemini's replication fits "
            "a few-iteration interval, so our Gemini is well above the paper's 0.728. Checked "
            "against the paper's one direct measurement of Gemini's cost, checkpointing every "
            "iteration (2.5x slower, Fig 1a), bytes give the right order (see the table above); "
            "what makes the paper's tuned Gemini cost 11-15% is not in its stated bytes and "
            "links.",
            "- MoC persisting its partial snapshot every iteration over the 40 Gbps storage link "
            "reproduces the order of the paper's 470% overhead and 0.134 ETTR.",
            "- The 671B row uses DeepSeek-V3's real layout on H800 (W = 1, 400 Gbps per GPU); "
            "the paper's 671B figures come from its simulator on another layout."]
    out += ["", "## Snapshot copies against the expert-parallel all-to-all (model)", "",
            "From `python -m megatron_moetion.bench.contention` (assumptions in its docstring): "
            "extra all-to-all time per iteration when the slot's device-to-host copy shares the "
            "GPU's PCIe link with off-node all-to-all traffic, copied in one burst or in chunks "
            "at the attention blocks (`--moetion-copy-interleave`). The last slot of every "
            "window is still a burst (it is copied at the window's close), so at W = 1 "
            "interleaving changes nothing; the paper's cluster keeps EP inside a node (no "
            "off-node all-to-all). Not measured: no GPU node was available.", "",
            contention.format_table([contention.model(p) for p in presets]),
            ]
    out += ["", "## ETTR (simulated) per preset and MTBF, with the paper's", "",
            summary_markdown(tables)]
    for name in (PAPER_16B, PAPER_671B):
        if name in tables:
            out += ["", f"## {name}: every ETTR cell beside the paper's", "",
                    tables[name].markdown]
    notes = [n for name in (PAPER_16B, PAPER_671B) if name in tables
             for n in tables[name].explanations]
    out += ["", "## Where and why we differ from the paper (cells more than 0.03 away)", ""]
    out += [f"- {n}" for n in notes] or ["- none"]
    out += ["", "## Sources of every input", ""]
    for name, i in inputs.items():
        out += [f"### {name}", "", sources_markdown(i), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables and write ``--out`` (default ``docs/performance.md``)."""
    ap = argparse.ArgumentParser(prog="python -m megatron_moetion.bench.performance")
    ap.add_argument("--out", type=Path, default=DOC)
    ap.add_argument("--num-runs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    if a.num_runs < 1:
        ap.error(f"--num-runs must be >= 1, got {a.num_runs}")
    inputs, tables = build(num_runs=a.num_runs)
    text = document(inputs, tables, a.num_runs)
    print(text)
    if not a.no_write:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text, encoding="utf-8")
        print(f"[performance] wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
