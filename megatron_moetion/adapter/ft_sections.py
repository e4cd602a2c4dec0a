"""A MoEtion recovery under Megatron's fault-tolerance package (``--enable-ft-package``).

nvidia-resiliency-ext's rank monitor (``ft_launcher``) times sections of every rank: "setup",
"step" (every training iteration after the warm-up ones, a timeout it learns from the steps it
saw) and "checkpointing"; time outside them counts against ``rank_out_of_section_timeout``.
A localized recovery runs inside the iteration whose attempt was aborted, so inside "step":
it would trip the step timeout (a replay of several iterations is longer than one step) or,
with ``--calc-ft-timeouts``, teach it a step time that is really a recovery's. So the recovery
runs outside the section: ``outside_the_step_section`` closes "step" before it and opens it
again after, where Megatron's ``ft_integration`` has it open. Nothing happens without FT.
"""

from __future__ import annotations

import contextlib


def _step_section_open(ft) -> bool:
    """Whether Megatron's ``ft_integration`` opened "step" for this training iteration (it
    does after its warm-up iterations, ``on_training_step_start``)."""
    return ft._seen_tr_iters_cnt >= ft._NUM_WARMUP_ITERS


@contextlib.contextmanager
def outside_the_step_section(ft=None):
    """Close FT's "step" section around a recovery (see the module docstring). ``ft``:
    Megatron's ``ft_integration`` module (imported when None)."""
    if ft is None:
        from megatron.training import ft_integration as ft
    client = ft.get_rank_monitor_client()
    closed = client is not None and _step_section_open(ft)
    if closed:
        client.end_section("step")
    try:
        yield
    finally:
        if closed:
            client.start_section("step")
