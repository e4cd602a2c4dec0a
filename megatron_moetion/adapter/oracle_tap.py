"""Where the determinism oracle reads a live Megatron rank (``--moetion-oracle-dir``).

``OracleTap`` writes, through ``oracle.OracleRecorder``, one record per committed iteration (lm
loss, the MoE and MTP auxiliary losses of ``loss_metrics``, grad norm, skipped) and, every
``--moetion-oracle-interval`` iterations and at the end, the rank's whole state
(``RankState.oracle_state``). It works with MoEtion off too, so MoEtion-on and -off runs can be
compared.
"""

from __future__ import annotations

import torch

from megatron_moetion.adapter.rank_state import RankState
from megatron_moetion.oracle import OracleRecorder


def loss_metrics() -> dict[str, dict[str, list[float]]]:
    """This rank's per-layer auxiliary losses of the current iteration, as accumulated so far:
    ``{"moe": {name: [per layer]}, "mtp": {name: [per layer]}}``.

    Megatron's ``loss_dict`` holds only ``lm loss``. The routers record their aux losses
    (``load_balancing_loss``, ``seq_load_balancing_loss``, ``global_load_balancing_loss``,
    ``z_loss``) in the MoE metrics tracker (``moe_logging.get_moe_metrics_tracker()``), and the
    MTP layers theirs in ``MTPLossLoggingHelper.tracker``, summed over the micro-batches of the
    iteration; ``training_log`` reduces them across ranks and clears them. ``on_train_step_end``
    runs before ``training_log``, so these are this rank's own unreduced sums of the iteration.
    Entries that hold only zeros are left out.
    """
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    out: dict[str, dict[str, list[float]]] = {"moe": {}, "mtp": {}}
    for name, entry in sorted(get_moe_metrics_tracker().metrics.items()):
        # an entry that only holds zeros is one ``training_log`` registered for logging (it
        # logs an absent name as zeros too): a process that joined later has not got it yet
        if torch.count_nonzero(entry.values) == 0:
            continue
        out["moe"][name] = [float(v) for v in entry.values.detach().double().cpu().tolist()]
    try:
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    except ImportError:  # pragma: no cover - present in megatron-core 0.19
        return out
    for name in ("loss_values", "correct_values", "total_values"):
        values = MTPLossLoggingHelper.tracker.get(name)
        if torch.is_tensor(values):
            out["mtp"][name] = [float(v) for v in values.detach().double().cpu().tolist()]
    return out


class OracleTap:
    """This process's oracle dump (see the module docstring)."""

    def __init__(self, directory: str, rank: int, interval: int):
        self.recorder = OracleRecorder(directory, rank, interval)
        self.state: RankState | None = None

    def bind(self, model, optimizer, scheduler) -> None:
        """The generation's Megatron objects (None between generations)."""
        self.state = None if model is None else RankState(model, optimizer, scheduler)

    def on_train_step_end(self, iteration: int, loss_dict, grad_norm, skipped_iter) -> None:
        """Runs once per committed iteration, before ``training_log`` reduces and clears the
        auxiliary-loss trackers."""
        losses = {k: float(v.item() if hasattr(v, "item") else v)
                  for k, v in (loss_dict or {}).items()}
        norm = None if grad_norm is None else float(grad_norm)
        self.recorder.record_iteration(iteration, losses, norm, int(skipped_iter),
                                       metrics=loss_metrics())
        if self.recorder.wants_state(iteration) and self.state is not None:
            tensors, scalars = self.state.oracle_state()
            self.recorder.dump_state(tensors, scalars, iteration=iteration)

    def finish(self, last_checkpoint_save: int | None) -> None:
        if self.state is not None:
            tensors, scalars = self.state.oracle_state()
            self.recorder.dump_state(tensors, scalars,
                                     meta={"last_checkpoint_save": last_checkpoint_save})
