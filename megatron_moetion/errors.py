"""Exception hierarchy of megatron_moetion.

User input errors are ``ConfigError`` (a ``ValueError``); everything that goes wrong at run time
derives from ``MoEtionError`` so callers can catch the whole family. Messages say what was
expected, what was found, and what to do.
"""

from __future__ import annotations


class MoEtionError(Exception):
    """Base class of every error raised by megatron_moetion."""


class ConfigError(MoEtionError, ValueError):
    """A flag, environment variable or configuration value is invalid."""


class FaultPlanError(ConfigError):
    """``--moetion-fault-plan`` / ``MOETION_FAULT_PLAN`` could not be parsed."""


class UnsupportedConfigurationError(MoEtionError):
    """The Megatron configuration uses a feature MoEtion cannot snapshot or replay exactly."""


class SnapshotFormatError(MoEtionError):
    """A persisted snapshot file has an unknown version, a bad header or a checksum mismatch."""


class RecoveryError(MoEtionError):
    """Recovery could not restore an exact state.

    Args:
        message: what could not be recovered and why.
        lost: per-rank description of what was lost, printed one line per rank.
    """

    def __init__(self, message: str, lost: dict[int, str] | None = None):
        self.lost = dict(lost or {})
        lines = [message] + [f"  rank {r}: {why}" for r, why in sorted(self.lost.items())]
        super().__init__("\n".join(lines))

