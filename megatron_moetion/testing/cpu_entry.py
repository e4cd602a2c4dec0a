"""Run a Megatron-LM entry script (``pretrain_gpt.py``) on CPU with gloo, unchanged.

``pretrain_gpt.py`` is not in the megatron-core wheel, so CI runs the equivalent CPU driver
(``demo/pretrain_moe_cpu.py``); with a Megatron-LM checkout at the pin, patched by
``scripts/apply_patches.sh``, this runs the real script: the CPU support first
(``testing.cpu_support``), then the script as ``__main__`` with its own directory on the path
(it imports ``gpt_builders`` and ``model_provider`` from there)::

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc-per-node 4 \\
        megatron_moetion/testing/cpu_entry.py /path/to/Megatron-LM/pretrain_gpt.py <flags>

``tests/megatron/test_pretrain_gpt.py`` runs it where ``MOETION_MEGATRON_LM`` names such a
checkout.
"""

from __future__ import annotations

import faulthandler
import os
import runpy
import signal
import sys


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        raise SystemExit("usage: cpu_entry.py /path/to/Megatron-LM/pretrain_gpt.py [flags...]")
    script = os.path.abspath(sys.argv[1])
    if not os.path.isfile(script):
        raise SystemExit(f"cpu_entry.py: no script at {script}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's dump on timeout
    import torch

    torch.set_num_threads(1)
    from megatron_moetion.testing import cpu_support

    cpu_support.install()
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
