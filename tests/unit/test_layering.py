"""The package's layers, enforced on its imports.

* runtime core (``megatron_moetion/*.py`` but ``megatron_hooks``): no Megatron, and nothing from
  the layers above (adapter, testing, tools); its pure part not even ``torch.distributed``;
* Megatron adapter (``adapter/``): may import Megatron and the core, not testing or tools;
* testing (``testing/``): the core, the adapter, Megatron (the CPU support, test optimizers);
* tools (``bench/``, ``demo/``): anything but the hooks, except the CPU driver that runs
  Megatron's ``pretrain()``;
* ``megatron_hooks``: a facade over ``adapter.runtime``; nothing imports it but that driver.

And no import circle between the package's modules.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "megatron_moetion"
NAME = "megatron_moetion"

# The pure core: plain data and arithmetic (torch tensors at most), no process groups.
PURE = ("config.py", "errors.py", "schedule.py", "topology.py", "recovery_plan.py",
        "fault_plan.py", "operators.py", "bench/calculator.py", "bench/presets.py",
        "bench/ettr.py", "bench/ettr_paper.py")
HOOKS_DRIVER = "demo/pretrain_moe_cpu.py"


def modules():
    return sorted(p for p in PKG.rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(PKG))


def layer(relpath: str) -> str:
    if relpath == "megatron_hooks.py":
        return "hooks"
    top = relpath.split("/")[0]
    return {"adapter": "adapter", "testing": "testing", "bench": "tools",
            "demo": "tools"}.get(top, "core")


def imports(path: Path, *, top_level_only: bool = False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == NAME or node.module.endswith((".adapter", ".testing", ".bench")):
                yield from (f"{node.module}.{alias.name}" for alias in node.names)


def module_path(name: str) -> str | None:
    """``megatron_moetion.a.b`` -> ``a/b.py`` (or the package's ``__init__.py``)."""
    parts = name.split(".")[1:]
    for candidate in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
        if candidate and (PKG / candidate).exists():
            return candidate
    return None


def internal_imports(path: Path, **kw) -> set[str]:
    out = set()
    for m in imports(path, **kw):
        if m == NAME or m.startswith(NAME + "."):
            target = module_path(m)
            if target is not None and not target.endswith("__init__.py"):
                out.add(target)
    return out


ALLOWED = {  # layer -> layers it may import
    "core": {"core"},
    "adapter": {"core", "adapter"},
    "testing": {"core", "adapter", "testing"},
    "tools": {"core", "adapter", "testing", "tools"},
    "hooks": {"core", "adapter"},
}


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_no_import_goes_up_a_layer(path):
    here = rel(path)
    bad = sorted(t for t in internal_imports(path)
                 if layer(t) not in ALLOWED[layer(here)]
                 and not (layer(t) == "hooks" and here == HOOKS_DRIVER))
    assert not bad, f"{here} ({layer(here)}) imports {bad}"


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_megatron_only_in_the_adapter_testing_and_driver(path):
    here = rel(path)
    if layer(here) in ("adapter", "testing") or here == HOOKS_DRIVER:
        return
    bad = [m for m in imports(path) if m == "megatron" or m.startswith("megatron.")]
    assert not bad, f"{here} imports {bad}; only the adapter layer may import megatron"


def test_hooks_and_runtime_import_no_megatron_or_torch_at_import_time():
    # megatron/training/arguments.py imports megatron_hooks while megatron is being imported
    for name, allowed in (("megatron_hooks.py", {"config.py", "adapter/runtime.py"}),
                          ("adapter/runtime.py", {"config.py"})):
        top = list(imports(PKG / name, top_level_only=True))
        assert not [m for m in top if m.startswith(("megatron.", "torch"))], (name, top)
        assert internal_imports(PKG / name, top_level_only=True) <= allowed, name


@pytest.mark.parametrize("relpath", PURE)
def test_pure_core_has_no_process_groups(relpath):
    bad = [m for m in imports(PKG / relpath) if m.startswith("torch.distributed")]
    assert not bad, f"{relpath} is in the pure layer but imports {bad}"


def test_no_import_circle():
    graph = {rel(p): internal_imports(p) - {rel(p)} for p in modules()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(
                    stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_package_import_has_no_side_effects():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, megatron_moetion, "
                          "megatron_moetion.megatron_hooks; print('torch' in sys.modules, "
                          "'megatron.core' in sys.modules)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
