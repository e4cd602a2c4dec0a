"""An Adam that keeps ``step`` per parameter group, as Transformer Engine's and Apex's FusedAdam do.

Both fused optimizers count steps in ``param_groups[i]["step"]`` (one counter per group,
incremented on every ``step()``, also for parameters without a gradient) and read it for the
bias correction; they keep only ``exp_avg`` and ``exp_avg_sq`` per parameter. Neither builds on
a CPU machine, so the CPU tests train with this stand-in to check that MoEtion's snapshots,
replay and handover carry group-level state. Same constructor as Megatron calls FusedAdam with
(``adam_w_mode``, ``capturable``); the arithmetic is plain Adam(W), deterministic on CPU.

The CPU driver (``demo/pretrain_moe_cpu.py --test-optimizer group-step-adam``) makes
Megatron's optimizer factory build it wherever it would build FusedAdam.
"""

from __future__ import annotations

import torch


class GroupStepAdam(torch.optim.Optimizer):
    """Adam(W) with a per-group ``step`` (see module docstring)."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adam_w_mode: bool = True, weight_decay: float = 0.0, capturable: bool = False):
        if capturable:
            raise ValueError("GroupStepAdam: capturable (CUDA graphs) is not supported")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            if group["bias_correction"]:
                correction1 = 1.0 - beta1 ** group["step"]
                correction2 = 1.0 - beta2 ** group["step"]
            else:
                correction1 = correction2 = 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                grad = p.grad
                if wd and not self.adam_w_mode:
                    grad = grad.add(p, alpha=wd)
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(eps)
                update = (state["exp_avg"] / correction1).div_(denom)
                if wd and self.adam_w_mode:
                    update.add_(p, alpha=wd)
                p.add_(update, alpha=-lr)
        return loss

