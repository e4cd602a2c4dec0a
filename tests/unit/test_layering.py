"""Import rules: Megatron only in the adapter layer; the pure core imports no torch.distributed."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "megatron_moetion"

# Modules that may import megatron (the adapter layer and the CPU demo driver).
MEGATRON_ALLOWED = ("adapter/", "demo/pretrain_moe_cpu.py", "_compat.py", "megatron_hooks.py")
# The pure core: plain data and arithmetic (torch tensors at most), no process groups.
PURE = ("config.py", "errors.py", "schedule.py", "topology.py", "conversion.py",
        "recovery_plan.py", "ettr.py", "ettr_paper.py", "calculator.py", "testing/faults.py", "operators.py")


def modules():
    return sorted(p for p in PKG.rglob("*.py"))


def imports(path: Path, *, top_level_only: bool = False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_megatron_only_in_the_adapter_layer(path):
    rel = str(path.relative_to(PKG))
    if rel.startswith(MEGATRON_ALLOWED):
        return
    bad = [m for m in imports(path) if m == "megatron" or m.startswith("megatron.")]
    assert not bad, f"{rel} imports {bad}; only the adapter layer may import megatron"


def test_hooks_module_imports_no_megatron_at_import_time():
    # megatron/training/arguments.py imports megatron_hooks while megatron is being imported
    bad = [m for m in imports(PKG / "megatron_hooks.py", top_level_only=True)
           if m.startswith("megatron.") or m.startswith("megatron_moetion.adapter")]
    assert not bad, bad


@pytest.mark.parametrize("rel", [r for r in PURE if (PKG / r).exists()])
def test_pure_core_has_no_process_groups(rel):
    bad = [m for m in imports(PKG / rel) if m.startswith("torch.distributed")
           or m.startswith("megatron_moetion.adapter")]
    assert not bad, f"{rel} is in the pure layer but imports {bad}"


def test_package_import_has_no_side_effects():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, megatron_moetion, "
                          "megatron_moetion.megatron_hooks; print('torch' in sys.modules, "
                          "'megatron.core' in sys.modules)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
