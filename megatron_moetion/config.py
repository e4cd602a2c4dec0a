"""``MoEtionConfig``: the one typed configuration of megatron_moetion, and its CLI flags.

Every field becomes a ``--moetion-<field-with-dashes>`` flag in one argparse group, which the
patched ``megatron/training/arguments.py`` adds to Megatron's parser. ``from_args`` turns the
parsed namespace back into a validated config; validation raises ``ConfigError`` naming the
flag, the bad value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_moetion.errors import ConfigError

FLAG_PREFIX = "moetion"
ENV_FAULT_PLAN = "MOETION_FAULT_PLAN"
# --moetion-negative-control: "skip_conversion" resumes stale operators (MoC-style) and turns the
# survivors' self-check off, so the run completes and the bitwise oracle must see the damage;
# with "keep_checks" the self-check stays on. "skip_rng_restore" / "skip_buffer_restore": a
# replaying rank keeps the RNG streams / router buffers the failure left it.
# "group_step_off_by_one": the anchor's group-level optimizer step is restored one too high.
# "flip_frozen_ulp": a FROZEN expert weight of the anchor slot is one ULP off.
# "stale_survivors": survivors of an in-place replacement lose their optimizer state.
# "recovery_in_step_section": under --enable-ft-package a recovery stays inside FT's "step"
# section (its step timeout must then end the rank).
# "buddy_sends_own_data": at PP = 1 a buddy sends a failed rank its own micro-batches instead of
# the ones the failed rank shipped it (the survivors' self-check is off, unless "keep_checks").
NEGATIVE_CONTROLS = ("skip_conversion", "keep_checks", "skip_rng_restore", "skip_buffer_restore",
                     "group_step_off_by_one", "flip_frozen_ulp", "stale_survivors",
                     "recovery_in_step_section", "buddy_sends_own_data")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(kw_only=True, frozen=True, slots=True)
class MoEtionConfig:
    """Configuration of sparse checkpointing, upstream logging and localized recovery."""

    enabled: bool = field(
        default=False,
        metadata=_help(
            "Turn MoEtion on: sparse snapshots every iteration, buddy replication, upstream "
            "logging and localized recovery. Every other --moetion-* flag needs it, except "
            "--moetion-oracle-dir.",
            flag="--moetion",
        ),
    )
    window: int = field(
        default=0,
        metadata=_help(
            "Sparse window W (iterations to capture every operator once). 0 picks the smallest W "
            "whose per-iteration snapshot fits the measured forward+backward time (Algorithm 1); "
            "1 is dense (every operator's full state every iteration, Gemini-style).",
            allowed=(lambda v: v >= 0, "an integer >= 0 (0 = automatic)"),
        ),
    )
    replication_factor: int = field(
        default=2,
        metadata=_help(
            "Buddy ranks (on other nodes where there are several) that hold a copy of each "
            "window. 0 keeps snapshots local only. Capped by the world size, with a warning.",
            allowed=(lambda v: v >= 0, "an integer >= 0"),
        ),
    )
    copy_bandwidth_gbps: float = field(
        default=0.0,
        metadata=_help(
            "Device-to-host copy bandwidth per GPU in GB/s used to size W (its share of a PCIe "
            "switch shared with other GPUs). 0 measures it at start-up, every rank at once.",
            allowed=(lambda v: v >= 0, ">= 0 (0 = measure)"),
        ),
    )
    network_bandwidth_gbps: float = field(
        default=0.0,
        metadata=_help(
            "The node's network bandwidth in GB/s for replication to buddies, shared by the "
            "node's ranks; W grows until a window's replication to every buddy fits W "
            "iterations. 0 measures each rank's share at start-up with a short probe on the "
            "replication group (every rank sending to a buddy at once).",
            allowed=(lambda v: v >= 0, ">= 0 (0 = measure)"),
        ),
    )
    copy_interleave: bool = field(
        default=True,
        metadata=_help(
            "On GPU, issue each snapshot's device-to-host copies in chunks at the start of the "
            "forward's attention blocks, where no expert-parallel all-to-all is in flight, "
            "instead of in one burst after the optimizer step (they share PCIe with the "
            "all-to-all's NIC traffic). The last slot of a window is copied at the window's "
            "close. No effect on CPU, where copies are synchronous."
        ),
    )
    copy_chunk_mb: float = field(
        default=0.0,
        metadata=_help(
            "Size in MiB of those chunks; 0 spreads each snapshot evenly over the quiet "
            "points of the previous iteration.",
            allowed=(lambda v: v >= 0, ">= 0 (0 = automatic)"),
        ),
    )
    iter_time_s: float = field(
        default=0.0,
        metadata=_help(
            "Forward+backward time per iteration in seconds used to size W. 0 measures it "
            "(median of recent iterations).",
            allowed=(lambda v: v >= 0, ">= 0 (0 = measure)"),
        ),
    )
    upstream_logging: bool = field(
        default=True,
        metadata=_help(
            "Keep the activations and gradients each pipeline stage sends, so that only the "
            "failed stage replays after a failure. Off means every failure rolls back globally."
        ),
    )
    fault_plan: str = field(
        default="",
        metadata=_help(
            "Faults to inject, e.g. 'rank=3,iter=12,phase=bwd,kind=lose_state'; several "
            f"separated by ';'. Also read from ${ENV_FAULT_PLAN} (the flag wins)."
        ),
    )
    metrics_file: str = field(
        default="",
        metadata=_help(
            "Write per-iteration and per-recovery metrics as JSON lines to this path; "
            "'{rank}' in the path is replaced by the global rank."
        ),
    )
    persist_dir: str = field(
        default="",
        metadata=_help(
            "Also write each persisted window to this directory in the background "
            "(versioned, checksummed format)."
        ),
    )
    oracle_dir: str = field(
        default="",
        metadata=_help(
            "Dump per-iteration losses (lm, MoE aux, MTP) and grad norms and, every "
            "--moetion-oracle-interval iterations and at the end, everything each rank holds "
            "(parameters, optimizer state and parameter groups, buffers, LR scheduler, RNG "
            "streams, loss scale, consumed samples) here, for the bitwise determinism oracle. "
            "Works with --moetion off too."
        ),
    )
    oracle_interval: int = field(
        default=4,
        metadata=_help(
            "With --moetion-oracle-dir: also dump each rank's whole state after every iteration "
            "that is a multiple of this; 0 dumps the final state only.",
            allowed=(lambda v: v >= 0, "an integer >= 0"),
        ),
    )
    reorder_threshold: float = field(
        default=0.10,
        metadata=_help(
            "Relative change in an expert's token share that counts as a popularity change.",
            allowed=(lambda v: 0 < v < 10, "in (0, 10)"),
        ),
    )
    reorder_fraction: float = field(
        default=0.25,
        metadata=_help(
            "Reorder operators (at a window boundary) when at least this fraction of experts "
            "changed popularity by more than --moetion-reorder-threshold.",
            allowed=(lambda v: 0 < v <= 1, "in (0, 1]"),
        ),
    )
    popularity_window_iters: int = field(
        default=100,
        metadata=_help("Rolling window of router token counts used for popularity ordering.",
                       allowed=(lambda v: v >= 2, "an integer >= 2")),
    )
    replication_chunk_mb: int = field(
        default=16,
        metadata=_help(
            "Replication sends windows in chunks of this many MiB, so it never holds up a "
            "training collective for long.",
            allowed=(lambda v: v >= 1, "an integer >= 1"),
        ),
    )
    host_memory_cap_mb: int = field(
        default=0,
        metadata=_help(
            "Cap in MiB on the host memory MoEtion holds per rank (its windows, the buddy "
            "copies it keeps, upstream logs). Logs are dropped only when a window is promoted, "
            "which stalls while replication does; past the cap the oldest logs are dropped "
            "(one warning), and a failure that needs them falls back to the persistent "
            "checkpoint. 0 sizes it automatically: room for 3 own windows and 3 copies per "
            "rank this one is a buddy of, plus the logs of 3W + 2*max(W, R) iterations, R the "
            "longest acknowledged replication round (normal operation needs 2W + 2R).",
            allowed=(lambda v: v >= 0, "an integer >= 0 (0 = automatic)"),
        ),
    )
    timeout_s: float = field(
        default=300.0,
        metadata=_help(
            "Timeout in seconds for MoEtion's own collectives (agreement, replication, "
            "recovery transfers).",
            allowed=(lambda v: v > 0, "> 0"),
        ),
    )

    heartbeat_interval_s: float = field(
        default=1.0,
        metadata=_help(
            "Seconds between a rank's liveness heartbeats (a background thread writes them to "
            "the job's rendezvous store).",
            allowed=(lambda v: v > 0, "> 0"),
        ),
    )
    detect_timeout_s: float = field(
        default=30.0,
        metadata=_help(
            "A rank whose heartbeat has not changed for this many seconds is declared dead "
            "(killed, or stopped answering); every rank then stops within about one heartbeat "
            "and the job restarts from the last persistent checkpoint. At least twice "
            "--moetion-heartbeat-interval-s.",
            allowed=(lambda v: v > 0, "> 0"),
        ),
    )

    rack_id: str = field(
        default="",
        metadata=_help(
            "The rack (or other failure domain above a node) this rank's node is in, e.g. "
            "'--moetion-rack-id $RACK' from the job script; '{rank}' is filled in. Buddies then "
            "go to nodes of other racks first, so a rack failure leaves a copy. Empty: "
            "racks unknown (buddies only on other nodes)."
        ),
    )

    # Settings for tests, benchmarks and debugging: typed here like every other setting, never
    # read from the environment. Leave them at their defaults in production runs.
    node_id: str = field(
        default="",
        metadata=_help(
            "Testing: the node name used for buddy placement, '{rank}' filled in (e.g. "
            "'node{rank}' makes every rank a node of its own on one host). Empty: torchrun's "
            "GROUP_RANK, else the host name.",
            testing=True,
        ),
    )
    debug_dump_dir: str = field(
        default="",
        metadata=_help(
            "Testing: after every optimizer step write this rank's live state, and at the end "
            "the buddy copies it holds, to this directory (tests compare snapshots with them).",
            testing=True,
        ),
    )
    debug_recovery_delay_s: float = field(
        default=0.0,
        metadata=_help(
            "Testing: every rank waits this long at the start of each recovery (a recovery as "
            "long as a real one's, for the timeouts around it).",
            allowed=(lambda v: v >= 0, ">= 0"),
            testing=True,
        ),
    )
    negative_control: str = field(
        default="",
        metadata=_help(
            "Testing: a deliberately wrong recovery that the checks or the bitwise oracle must "
            "catch; a comma-separated subset of: " + ", ".join(NEGATIVE_CONTROLS) + ".",
            allowed=(lambda v: set(filter(None, v.split(","))) <= set(NEGATIVE_CONTROLS),
                     "a comma-separated subset of " + ", ".join(NEGATIVE_CONTROLS)),
            testing=True,
        ),
    )
    bench_baseline: str = field(
        default="",
        metadata=_help(
            "Benchmarks: 'moc' snapshots like MoC-System's partial checkpoints (each slot's "
            "operators in full, no FROZEN compute weights: no exact recovery).",
            allowed=(lambda v: v in ("", "moc"), "'' or 'moc'"),
            testing=True,
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("allowed")
            if allowed is not None and not allowed[0](getattr(self, f.name)):
                raise ConfigError(f"{flag_name(f)} must be {allowed[1]}; got "
                                  f"{getattr(self, f.name)!r}")
        if self.detect_timeout_s < 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"--moetion-detect-timeout-s must be at least twice --moetion-heartbeat-"
                f"interval-s ({2 * self.heartbeat_interval_s:g}); got {self.detect_timeout_s:g}")
        if not self.enabled:
            # Fault plans and sparse-checkpoint settings need MoEtion itself; silently
            # ignoring them would let a user believe they are protected.
            for name in ("fault_plan", "persist_dir", "metrics_file", "node_id", "rack_id",
                         "debug_dump_dir", "debug_recovery_delay_s", "negative_control",
                         "bench_baseline"):
                if getattr(self, name):
                    raise ConfigError(
                        f"--{FLAG_PREFIX}-{name.replace('_', '-')} needs --moetion; "
                        f"got it without --moetion"
                    )
        if self.fault_plan:
            from megatron_moetion.fault_plan import FaultPlan

            FaultPlan.parse(self.fault_plan)  # raises FaultPlanError on a malformed plan

    @property
    def negative_controls(self) -> frozenset[str]:
        return frozenset(filter(None, self.negative_control.split(",")))

    @property
    def replication_chunk_bytes(self) -> int:
        return self.replication_chunk_mb * (1 << 20)

    @property
    def host_memory_cap_bytes(self) -> int:
        return self.host_memory_cap_mb * (1 << 20)


def _argparse_type(kind, f: dataclasses.Field):
    """Parse and check one flag's value, so argparse rejects it before training starts."""
    allowed = f.metadata.get("allowed")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if allowed is not None and not allowed[0](value):
            raise argparse.ArgumentTypeError(f"must be {allowed[1]}; got {value!r}")
        if f.name == "fault_plan" and value:
            from megatron_moetion.fault_plan import FaultPlan

            try:
                FaultPlan.parse(value)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = kind.__name__
    return parse


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{FLAG_PREFIX}-{f.name.replace('_', '-')}"


def dest_name(f: dataclasses.Field) -> str:
    return f"{FLAG_PREFIX}_{f.name}" if f.name != "enabled" else FLAG_PREFIX


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``moetion`` argument group to a Megatron (or any argparse) parser."""
    group = parser.add_argument_group(title="moetion")
    for f in dataclasses.fields(MoEtionConfig):
        flag, dest, help_text = flag_name(f), dest_name(f), f.metadata["help"]
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            group.add_argument(flag, dest=dest, type=_argparse_type(kind, f), default=f.default,
                               help=help_text)
    return parser


def from_args(args: argparse.Namespace) -> MoEtionConfig:
    """Build the config from a parsed namespace (Megatron's ``args``).

    ``MOETION_FAULT_PLAN`` fills the fault plan when the flag is not given.
    """
    values = {}
    for f in dataclasses.fields(MoEtionConfig):
        values[f.name] = getattr(args, dest_name(f), f.default)
    if not values["fault_plan"]:
        values["fault_plan"] = os.environ.get(ENV_FAULT_PLAN, "")
    return MoEtionConfig(**values)
