"""Pins and capability probes for the Megatron versions this package is built against.

The patch series in ``patches/`` is written against Megatron-LM tag ``core_v0.19.0``; the
``megatron-core==0.19.2`` wheel ships byte-identical copies of every file the series touches,
so CI applies the series to the wheel. ``require_megatron()`` fails with a message naming the
expected and found versions instead of a stray AttributeError deep in a hook.
"""

from __future__ import annotations

import importlib.util

from megatron_moetion.errors import MegatronVersionError

MEGATRON_LM_REF = "core_v0.19.0"
MEGATRON_LM_SHA = "5be9626709af2722333bf54797c954c09edeada3"
MEGATRON_CORE_VERSION = "0.19.2"
# Versions whose megatron/training files are byte-identical to MEGATRON_LM_REF for every file
# the patch series touches (checked by tests/patches).
SUPPORTED_MEGATRON_CORE_VERSIONS = ("0.19.0", "0.19.1", "0.19.2")


def have_megatron() -> bool:
    """Whether ``megatron.core`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False


def megatron_core_version() -> str:
    """The installed megatron-core version string, read from its package_info."""
    from megatron.core import package_info

    return ".".join(str(v) for v in package_info.VERSION[:3])


def require_megatron() -> str:
    """Check that a supported megatron-core is importable and return its version.

    Raises:
        MegatronVersionError: megatron-core is missing or not a supported version.
    """
    if not have_megatron():
        raise MegatronVersionError(
            f"megatron-core is not importable; expected megatron-core=={MEGATRON_CORE_VERSION} "
            f"(Megatron-LM {MEGATRON_LM_REF}). Hint: see README 'Set-up'."
        )
    found = megatron_core_version()
    if found not in SUPPORTED_MEGATRON_CORE_VERSIONS:
        raise MegatronVersionError(
            f"megatron-core {found} is not supported; expected one of "
            f"{', '.join(SUPPORTED_MEGATRON_CORE_VERSIONS)} (Megatron-LM {MEGATRON_LM_REF} "
            f"{MEGATRON_LM_SHA[:12]})."
        )
    return found
