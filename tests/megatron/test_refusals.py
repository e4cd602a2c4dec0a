"""Refusals at argument validation: the patched Megatron's own ``validate_args`` refuses what
MoEtion cannot replay exactly, before any model is built.

One interpreter parses and validates every case in turn with Megatron's real ``parse_args`` and
``validate_args`` from the patched tree (nothing else runs: no process group, no model), then
each case is checked on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_moetion.adapter.support import check_supported
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.demo.runner import RunConfig, megatron_flags
from megatron_moetion.errors import UnsupportedConfigurationError

pytestmark = pytest.mark.megatron

REPO = Path(__file__).resolve().parents[2]
UNTIE = "--untie-embeddings-and-output-weights"
BASE = RunConfig(moetion=True)  # the demo's PP=2 x EP=2 x DP=2 layout, untied embeddings
PP1 = RunConfig(moetion=True, pp=1)

# name: (run, flags added, flags dropped, [(flag named, reason named), ...]); [] = accepted
CASES = {
    "tied embeddings, PP 2": (BASE, [], [UNTIE],
                              [(UNTIE, "_allreduce_word_embedding_grads")]),
    "per-token loss, PP 2": (BASE, ["--calculate-per-token-loss"], [],
                             [("--calculate-per-token-loss", "token counts across pipeline")]),
    "MTP, PP 2": (BASE, ["--mtp-num-layers", "1"], [],
                  [("--mtp-num-layers", "config.mtp_num_layers is set (even with untied "
                                        "embeddings) finalize_model_grads._allreduce_word_")]),
    "fp8": (BASE, ["--fp8-format", "hybrid"], [], [("--fp8-format", "scaling state")]),
    "inprocess restart without the wrapped pretrain": (
        BASE, ["--inprocess-restart"], [],
        [("--inprocess-restart without the wrapped pretrain()", "maybe_wrap_for_inprocess")]),
    "non-persistent checkpoints": (BASE, ["--non-persistent-ckpt-type", "global",
                                          "--non-persistent-save-interval", "4"], [],
                                   [("--non-persistent-ckpt-type global", "per-rank RNG")]),
    "precision-aware optimizer": (BASE, ["--use-precision-aware-optimizer", "--bf16"], [],
                                  [("--use-precision-aware-optimizer", "FusedAdam")]),
    "lion optimizer": (BASE, ["--optimizer", "lion"], [],
                       [("--optimizer lion", "only Adam and SGD")]),
    "muon optimizer": (BASE, ["--optimizer", "muon"], [],
                       [("--optimizer muon", "only Adam and SGD")]),
    "CUDA graphs": (BASE, ["--cuda-graph-impl", "local"], [],
                    [("--cuda-graph-impl", "bypass MoEtion's hooks")]),
    "optimizer CUDA graph": (BASE, ["--optimizer-cuda-graph"], [],
                             [("--optimizer-cuda-graph", "bypass MoEtion's hooks")]),
    "torch FSDP2": (RunConfig(moetion=True, pp=1, ep=1, distributed_optimizer=False),
                    ["--use-torch-fsdp2"], [],
                    [("--use-torch-fsdp2", "only DDP")]),
    "expert rank capacity factor": (BASE, ["--moe-expert-rank-capacity-factor", "1.0"], [],
                                    [("--moe-expert-rank-capacity-factor", "paged-stash")]),
    "three at once": (BASE, ["--calculate-per-token-loss", "--mtp-num-layers", "1"], [UNTIE],
                      [(UNTIE, "first and last stage"), ("--mtp-num-layers", "MTP stage"),
                       ("--calculate-per-token-loss", "gradient finalisation")]),
    "accepted: demo layout": (BASE, [], [], []),
    "accepted: interleaved pipeline": (BASE, ["--num-virtual-stages-per-pipeline-rank", "2"],
                                       [], []),
    "accepted: PP 1 with MTP, per-token loss, tied embeddings":
        (PP1, ["--mtp-num-layers", "1", "--calculate-per-token-loss"], [UNTIE], []),
    "accepted: MoEtion off": (RunConfig(), ["--mtp-num-layers", "1", "--optimizer", "lion",
                                            "--calculate-per-token-loss"], [UNTIE], []),
}
# bad --moetion* values are ConfigErrors from the same hook: name: (run, added, message part)
BAD_VALUES = {
    "detect timeout below two heartbeats": (BASE, ["--moetion-detect-timeout-s", "1"],
                                            "--moetion-detect-timeout-s must be at least twice"),
    "metrics file without --moetion": (RunConfig(), ["--moetion-metrics-file", "m.jsonl"],
                                       "--moetion-metrics-file needs --moetion"),
}

PROBE = r"""
import json, os, sys, traceback
import torch
if not torch.cuda.is_available():
    from megatron_moetion.testing import cpu_support
    cpu_support.install()
import megatron.training.arguments as arguments
results = {"arguments_py": arguments.__file__}
for name, (world_size, argv) in json.loads(sys.stdin.read()).items():
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world_size), "0"
    sys.argv = ["pretrain"] + argv
    try:
        arguments.validate_args(arguments.parse_args(), {})
        results[name] = {"ok": True}
    except Exception as exc:
        frames = [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]
        results[name] = {"ok": False, "type": type(exc).__name__, "msg": str(exc),
                         "frames": frames}
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(patched_megatron, tmp_path_factory):
    arguments_py = patched_megatron / "megatron" / "training" / "arguments.py"
    if "megatron_hooks.validate_args(args)" not in arguments_py.read_text():
        pytest.fail(f"{arguments_py} predates the validate_args hook: run `make patched-megatron`")
    out = tmp_path_factory.mktemp("refusals")
    cases = {}
    for name, (run, added, dropped, *_rest) in {**CASES, **{
            k: (run, added, []) for k, (run, added, _) in BAD_VALUES.items()}}.items():
        flags = [f for f in megatron_flags(run, out) if f not in dropped]
        cases[name] = (run.world_size, flags + added)
    env = {**os.environ, "PYTHONPATH": f"{patched_megatron}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(cases), env=env,
                          capture_output=True, text=True, timeout=240, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    found = json.loads(line[len("RESULTS "):])
    assert Path(found["arguments_py"]).resolve() == arguments_py.resolve()
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_validate_args_refuses_what_moetion_cannot_replay(results, name):
    expected = CASES[name][3]
    got = results[name]
    if not expected:
        assert got["ok"], f"{name} was refused: {got.get('type')}: {got.get('msg')}"
        return
    assert not got["ok"], f"{name} was accepted"
    assert got["type"] == UnsupportedConfigurationError.__name__, got["msg"]
    assert got["msg"].startswith("--moetion cannot protect this configuration:")
    problems = got["msg"].splitlines()[1:]
    assert len(problems) == len(expected), got["msg"]  # every problem, each on its own line
    for (flag, reason), problem in zip(expected, problems):
        assert flag in problem.split(": ", 1)[0], problem  # the flag, before the reason
        assert reason in problem, problem
    # raised by Megatron's own validate_args through the hook: before any model exists
    names = [name for _, name in got["frames"]]
    assert names[-3:] == ["validate_args", "validate_args", "check_supported"], got["frames"]
    assert got["frames"][-3][0].endswith("megatron/training/arguments.py")
    assert got["frames"][-2][0].endswith("megatron_moetion/megatron_hooks.py")


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_moetion_values_are_refused_in_validate_args(results, name):
    got = results[name]
    assert not got["ok"] and got["type"] == "ConfigError", got
    assert BAD_VALUES[name][2] in got["msg"]
    assert ["validate_args", "validate_args", "from_args"] == [
        n for f, n in got["frames"] if f.endswith(("megatron/training/arguments.py",
                                                   "megatron_moetion/megatron_hooks.py",
                                                   "megatron_moetion/config.py"))][:3]


@pytest.mark.parametrize("args, flag", [
    (dict(fp4="e2m1"), "--fp4-format"),  # needs Transformer Engine >= 2.7 to pass Megatron
    (dict(use_megatron_fsdp=True), "--use-megatron-fsdp"),  # needs CUDA to pass Megatron
])
def test_refusals_megatron_itself_rejects_first_on_this_machine(args, flag):
    with pytest.raises(UnsupportedConfigurationError, match=flag):
        check_supported(SimpleNamespace(untie_embeddings_and_output_weights=True, **args),
                        MoEtionConfig(enabled=True))
