"""Loading a DistributedOptimizer checkpoint with torch.optim's Adam (no Apex, no TE).

Megatron's distributed optimizer checkpoints assume FusedAdam; with the torch.optim fallback
(on CPU, and on GPU without Apex or Transformer Engine) loading one fails or silently resumes
with the wrong Adam step. ``cpu_support`` installs these workarounds (distopt_step_key,
distopt_init_state, distopt_load_state); ``originals`` receives what each replaced.
"""

from __future__ import annotations

import torch


# --- megatron/core/optimizer/distrib_optimizer.py _set_main_param_and_optimizer_states copies
#     every tensor of the torch.optim state, including Adam's 'step', which fully_reshardable
#     checkpoints do not carry (KeyError: 'step'). Feed back the current value.
def patch_distopt_step_key(originals: dict) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    originals["distopt._set_main_param_and_optimizer_states"] = original

    def _set(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if torch.is_tensor(state.get("step")):
                tensors = {**tensors, "step": state["step"].clone()}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set


def init_optimizer_state_for_loading(megatron_optimizer) -> None:
    """Pre-create Adam state so ``DistributedOptimizer.state_dict()`` works before step 1.

    megatron/core/optimizer/distrib_optimizer.py state_dict asserts ``len(steps) == 1`` on the
    torch.optim fallback, but torch.optim has no state before its first ``step()``.
    """
    from megatron_moetion.adapter.optimizer_layout import ensure_optimizer_state

    ensure_optimizer_state(megatron_optimizer)


def fix_optimizer_step_after_load(megatron_optimizer) -> None:
    """Copy ``param_groups[i]['step']`` into every parameter's Adam state after a load.

    Megatron restores the step count only into the param group on the torch.optim fallback;
    without this, training continues with the wrong bias correction (silently diverges). The
    group's copy is then removed: a run that never restarted has none.
    """
    for opt in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            per_parameter = False
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]))
                    per_parameter = True
            if per_parameter:  # the load's copy: torch's Adam neither reads nor advances it
                del group["step"]  # (FusedAdam-style optimizers keep theirs)


# --- megatron/training/checkpointing.py load_checkpoint -> generate_state_dict ->
#     DistributedOptimizer.sharded_state_dict(is_loading=True) -> state_dict() asserts
#     len(steps) == 1, but a fresh torch.optim.Adam has no state yet.
def patch_distopt_init_state(originals: dict) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_state_dict
    originals["distopt.sharded_state_dict"] = original

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
        if is_loading and len(self.optimizer.state) == 0:
            init_optimizer_state_for_loading(self)
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict


# --- DistributedOptimizer.load_state_dict -> load_parameter_state_from_dp_reshardable copies
#     into views of leaf params outside no_grad (RuntimeError), and leaves Adam's per-param step
#     at its pre-load value (see fix_optimizer_step_after_load).
def patch_distopt_load_state(originals: dict) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict
    originals["distopt.load_state_dict"] = original

    def load_state_dict(self, state_dict):
        with torch.no_grad():
            out = original(self, state_dict)
        fix_optimizer_step_after_load(self)
        return out

    DistributedOptimizer.load_state_dict = load_state_dict
