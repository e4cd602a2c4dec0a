"""Tools that measure and model what MoEtion costs and saves; no training run imports them.

* ``python -m megatron_moetion.bench``: the side-by-side benchmark on CPU (``runs``), with its
  plots (``plots``, needs matplotlib); ``gpu``: the measurements only a GPU shows.
* ``python -m megatron_moetion.bench.calculator``: snapshot bytes, sparse window and host memory
  for real MoE configurations (``presets``).
* ``ettr``, ``ettr_inputs`` and ``ettr_paper``: effective training time ratio under failures,
  its inputs from FLOPs, bytes and bandwidths per preset, and our ETTRs next to the paper's;
  ``python -m megatron_moetion.bench.performance`` writes them to ``docs/performance.md``.
* ``reporting``: the snapshot-cost summary of a run's metrics files (the demo's report).

Nothing here is imported by the package at import time; import the submodules explicitly.
"""
