"""Record, and during replay inject, the global values an optimizer step computes across stages.

Megatron's optimizer step reduces two values over all pipeline stages: the gradient norm used
for clipping (``ChainedOptimizer.get_grad_norm``) and, with fp16 loss scaling, the found-inf
flag (``_unscale_main_grads_and_check_for_nan``). A stage-local replay cannot compute them
(the other stages are paused), so ``OptimizerProbe`` wraps both on the optimizer instances:
normally it records the exact value returned (the float or tensor clipping used, before any
logging rounds it), and in ``replaying(...)`` it returns the recorded one, and drops the
gradients of FROZEN operators' main weights so the inner optimizer skips them (no update, no
weight decay, no moment decay).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_moetion.adapter.optimizer_layout import sub_optimizers


def _exact(value):
    return value.detach().clone() if torch.is_tensor(value) else value


class OptimizerProbe:
    """Wraps ``optimizer`` in place (see module docstring)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.subs = sub_optimizers(optimizer)
        self.last: dict = {}
        self._replay: dict | None = None
        self._frozen: set[int] = set()
        self._orig = {
            "get_grad_norm": optimizer.get_grad_norm,
            "prepare_grads": optimizer.prepare_grads,
            "count_zeros": optimizer.count_zeros,
        }
        optimizer.get_grad_norm = self._get_grad_norm
        optimizer.prepare_grads = self._prepare_grads
        optimizer.count_zeros = self._count_zeros
        self._unscale_orig = {}
        for i, sub in enumerate(self.subs):
            if getattr(sub, "grad_scaler", None) is not None and hasattr(
                    sub, "_unscale_main_grads_and_check_for_nan"):
                self._unscale_orig[i] = sub._unscale_main_grads_and_check_for_nan
                sub._unscale_main_grads_and_check_for_nan = self._unscaler(i, sub)

    def begin_iteration(self) -> None:
        self.last = {"grad_norm": None, "found_inf": {}, "num_zeros": None}

    def _get_grad_norm(self):
        if self._replay is not None:
            return _exact(self._replay["grad_norm"])
        value = self._orig["get_grad_norm"]()
        self.last["grad_norm"] = _exact(value)
        return value

    def _count_zeros(self):
        if self._replay is not None:
            return self._replay.get("num_zeros")
        value = self._orig["count_zeros"]()
        self.last["num_zeros"] = value
        return value

    def _unscaler(self, index, sub):
        original = self._unscale_orig[index]

        def unscale_and_check():
            if self._replay is None:
                found = original()
                self.last["found_inf"][index] = bool(found)
                return found
            # the local part of Megatron's check (no cross-stage all-reduce), then the
            # recorded global verdict
            if not sub.is_stub_optimizer:
                main_grads = sub._collect_main_grad_data_for_unscaling()
                sub.found_inf.fill_(0.0)
                torch._amp_foreach_non_finite_check_and_unscale_(
                    main_grads, sub.found_inf, sub.grad_scaler.inv_scale)
            return bool(self._replay["found_inf"].get(index, False))

        return unscale_and_check

    def _prepare_grads(self):
        found_inf = self._orig["prepare_grads"]()
        if self._replay is not None and self._frozen:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in self._frozen:
                        p.grad = None
        return found_inf

    @contextmanager
    def replaying(self, record: dict, frozen_main_params: list[torch.Tensor]):
        """Inject ``record``'s values and skip ``frozen_main_params`` for one step."""
        self._replay, self._frozen = record, {id(p) for p in frozen_main_params}
        try:
            yield
        finally:
            self._replay, self._frozen = None, set()

    def uninstall(self) -> None:
        for name in self._orig:
            delattr(self.optimizer, name)
        for i, sub in enumerate(self.subs):
            if i in self._unscale_orig:
                del sub._unscale_main_grads_and_check_for_nan
