#!/usr/bin/env bash
# Build the patched Megatron tree from the pinned megatron-core wheel and check it.
#
#   scripts/check_patches.sh [OUT_DIR]
#
# Copies the installed megatron-core wheel's megatron/ tree (byte-identical to Megatron-LM
# core_v0.19.0 for every patched file) to OUT_DIR (default: a scratch folder), applies the
# series with scripts/apply_patches.sh, byte-compiles the patched files, imports the patched
# modules and checks that every hook call site is wired. Exits non-zero on any rejected hunk
# or failed check. The demo runs Megatron from OUT_DIR=build/megatron-patched.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
out=${1:-}
if [[ -z $out ]]; then out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

src=$("$python" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("megatron.core")
if spec is None:
    raise SystemExit("check_patches.sh: megatron-core is not installed (see README, Set-up)")
print(os.path.dirname(os.path.dirname(os.path.dirname(spec.origin))))
EOF
)
stamp="$out/.moetion-source"
want="$src $(cat "$here"/patches/MEGATRON_LM_REF "$here"/patches/series "$here"/patches/*.patch | sha256sum | cut -c1-16)"
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "patched Megatron tree in $out is up to date"
else
  rm -rf "$out/megatron" "$stamp"
  cp -r "$src/megatron" "$out/megatron"
  find "$out/megatron" -name __pycache__ -prune -exec rm -rf {} +
  bash "$here/scripts/apply_patches.sh" "$out"
  echo "$want" > "$stamp"
fi

touched=$(grep -h '^+++ b/' "$here"/patches/*.patch | sed 's|^+++ b/||' | sort -u)
for f in $touched; do
  "$python" -m py_compile "$out/$f"
done
echo "byte-compiled: ${touched//$'\n'/ }"

# Import the patched modules and check the hook wiring (CPU-only machines need the CPU
# support module to import megatron.training at all).
PYTHONPATH="$out:$here${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$out" <<'EOF'
import ast, sys
out = sys.argv[1]
from megatron_moetion.testing import cpu_support
cpu_support.install_for_this_machine()
import megatron.training.arguments as arguments
import megatron.training.training as training
for mod in (arguments, training):
    assert mod.__file__.startswith(out), f"{mod.__name__} imported from {mod.__file__}, not {out}"
from megatron_moetion import megatron_hooks
expected = {
    "arguments": {"add_arguments", "validate_args"},
    "training": {"setup", "wrap_forward_backward_func", "on_train_step_start",
                 "on_optimizer_step_end", "on_train_step_end", "on_checkpoint_save",
                 "on_checkpoint_load", "shutdown"},
}
for name, mod in (("arguments", arguments), ("training", training)):
    tree = ast.parse(open(mod.__file__).read())
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
              and n.func.value.id == "megatron_hooks"}
    missing = expected[name] - called
    assert not missing, f"{name}.py does not call megatron_hooks.{sorted(missing)}"
    for hook in called:
        assert callable(getattr(megatron_hooks, hook, None)), f"megatron_hooks.{hook} is missing"
parser = arguments.add_megatron_arguments(__import__("argparse").ArgumentParser())
ns = parser.parse_args(["--moetion", "--moetion-window", "3"])
assert ns.moetion is True and ns.moetion_window == 3
print("hook wiring ok:", ", ".join(sorted(expected["training"] | expected["arguments"])))
EOF
echo "check-patches: ok ($out)"
