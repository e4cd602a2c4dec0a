"""Group-level optimizer state: what FusedAdam keeps per parameter group is captured and restored.

Transformer Engine's and Apex's FusedAdam count ``step`` per parameter group, not per parameter;
``testing.group_step_adam.GroupStepAdam`` stands in for them on CPU. A restore must bring the
group's ``step`` back (the bias correction reads it), a spare's fresh optimizer must get the
per-parameter state of its optimizer kind and nothing else (a stray per-parameter ``step`` would
differ from the fault-free run's state), and torch Adam and SGD keep working as before.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_moetion.adapter import rank_state as ts
from megatron_moetion.adapter.optimizer_layout import ensure_optimizer_state
from megatron_moetion.testing.group_step_adam import GroupStepAdam


def train(opt, params, steps):
    for k in range(steps):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (k + 1))
        opt.step()


def params(n=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(n)]


def test_group_step_adam_counts_steps_per_group_and_skips_params_without_grad():
    ps = params()
    opt = GroupStepAdam([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.1}], lr=0.01)
    train(opt, ps, 3)
    ps[1].grad = None
    before = ps[1].detach().clone()
    opt.step()
    assert [g["step"] for g in opt.param_groups] == [4, 4]
    assert all("step" not in opt.state[p] for p in ps)
    assert torch.equal(ps[1].detach(), before)


def test_restoring_the_group_state_makes_the_next_steps_bitwise_equal():
    a = params()
    opt_a = GroupStepAdam(a, lr=0.01)
    train(opt_a, a, 3)
    saved_groups = ts.param_group_state(opt_a)
    saved = [{k: v.clone() for k, v in opt_a.state[p].items()} for p in a]
    weights = [p.detach().clone() for p in a]
    train(opt_a, a, 2)

    def rebuilt(restore_groups: bool):
        """A rank that lost its state gets a's weights and per-parameter state back."""
        b = params()
        opt_b = GroupStepAdam(b, lr=0.01)
        for p, w, state in zip(b, weights, saved):
            p.data.copy_(w)
            opt_b.state[p].update({k: v.clone() for k, v in state.items()})
        if restore_groups:
            ts.restore_param_groups(opt_b, saved_groups)
        train(opt_b, b, 2)
        return b

    assert all(torch.equal(x, y) for x, y in zip(a, rebuilt(True)))
    # without the group state the bias correction restarts from step 0
    assert not all(torch.equal(x, y) for x, y in zip(a, rebuilt(False)))


def test_restore_param_groups_restores_every_field_and_checks_the_count():
    ps = params()
    opt = GroupStepAdam(ps, lr=0.01, weight_decay=0.1)
    train(opt, ps, 2)
    saved = ts.param_group_state(opt)
    opt.param_groups[0].update(lr=0.5, weight_decay=0.0, step=99, betas=(0.1, 0.2))
    ts.restore_param_groups(opt, saved)
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == saved[0]
    with pytest.raises(RuntimeError, match="parameter groups"):
        ts.restore_param_groups(opt, saved + saved)


def sub(inner, init_state_fn=None):
    return SimpleNamespace(optimizer=inner, init_state_fn=init_state_fn, config=None)


@pytest.mark.parametrize("make, per_param", [
    (lambda ps: torch.optim.AdamW(ps, lr=0.01), {"exp_avg", "exp_avg_sq", "step"}),
    (lambda ps: GroupStepAdam(ps, lr=0.01), {"exp_avg", "exp_avg_sq"}),
    (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), {"momentum_buffer"}),
], ids=["torch_adamw", "group_step_adam", "sgd"])
def test_a_fresh_optimizer_gets_the_state_keys_its_kind_keeps(make, per_param):
    trained_params, fresh_params = params(), params()
    trained, fresh = make(trained_params), make(fresh_params)
    train(trained, trained_params, 1)
    ensure_optimizer_state(sub(fresh))
    assert set(fresh.state[fresh_params[0]]) == set(trained.state[trained_params[0]]) == per_param
