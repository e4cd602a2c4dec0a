"""Probe run in a fresh interpreter: install cpu_support, then check each workaround's effect
(and, where the original is kept, that Megatron's unpatched code fails on CPU). Prints JSON."""

import json
import sys
import traceback

import torch

from megatron_moetion.testing import cpu_support

results = {}


def check(name):
    def wrap(fn):
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=3)
        return fn
    return wrap


applied = cpu_support.install()
results["applied"] = applied


@check("nvrx_version")
def _():
    from megatron.core.dist_checkpointing.strategies.nvrx import has_nvrx_async_support

    try:
        import nvidia_resiliency_ext as nvrx
    except ImportError:
        return  # nothing to hide
    if getattr(nvrx, "__version__", None) is None:  # 0.4.x: Megatron must not use it
        assert not has_nvrx_async_support()
    import nvidia_resiliency_ext.inprocess  # noqa: F401  (the part MoEtion uses still imports)


@check("inprocess_nccl_init")
def _():
    from megatron.training import initialize, inprocess_restart

    assert initialize.inprocess_restart is inprocess_restart
    assert inprocess_restart.maybe_force_nccl_backend_init("cpu") is None  # no CUDA call
    original = cpu_support.originals["inprocess_restart.maybe_force_nccl_backend_init"]
    assert original is not inprocess_restart.maybe_force_nccl_backend_init


@check("paged_stash")
def _():
    ps = sys.modules["megatron.core.transformer.moe.ops.paged_stash"]
    try:
        ps.paged_stash_copy_kernel()
    except RuntimeError as e:
        assert "not available on CPU" in str(e)
    else:
        raise AssertionError("stub kernel did not raise")


@check("rng")
def _():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("moetion-probe", 123)
    torch.manual_seed(7)
    outside = torch.get_rng_state()
    with tracker.fork("moetion-probe"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside), "fork leaked the stream state"
    with tracker.fork("moetion-probe"):
        b = torch.rand(3)
    assert not torch.equal(a, b), "the named stream did not advance"


@check("streams")
def _():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.cuda.Event().query()


@check("current_device")
def _():
    assert torch.cuda.current_device() == "cpu"
    try:
        cpu_support.originals["torch.cuda.current_device"]()
    except (AssertionError, RuntimeError):
        pass  # the original fails on a CPU-only torch, which is why the workaround exists
    else:
        raise AssertionError("the original current_device() worked on CPU?")


@check("moe_dtoh")
def _():
    import megatron.core.transformer.moe.token_dispatcher as td
    out = td.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert type(out).__module__ == "numpy", type(out)
    orig = cpu_support.originals["moe_utils.maybe_move_tensor_to_cpu"]
    assert torch.is_tensor(orig(torch.tensor([1, 2]), as_numpy=True)), "original converts now?"


@check("device_mode")
def _():
    t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu" and t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).to("cuda:0").device.type == "cpu"


@check("typing_override")
def _():
    import typing
    assert typing.override(len) is len
    import megatron.training.training  # noqa: F401  (imports megatron/training/models/*.py)


@check("allow_no_cuda")
def _():
    import megatron.training.training as training
    assert training.initialize_megatron.keywords == {"allow_no_cuda": True}


@check("device_count")
def _():
    assert torch.cuda.device_count() == 1 and not torch.cuda.is_available()


@check("compile_helpers")
def _():
    import megatron.core.datasets.utils as du
    assert du.compile_helpers() is None
    from megatron.core.datasets import helpers_cpp  # noqa: F401


@check("distopt_step_key")
def _():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO
    assert DO._set_main_param_and_optimizer_states.__name__ == "_set"


@check("distopt_init_state")
def _():
    p = torch.nn.Parameter(torch.zeros(3))

    class FakeOpt:
        optimizer = torch.optim.Adam([p])
        init_state_fn = None
    opt = FakeOpt()
    cpu_support.init_optimizer_state_for_loading(opt)
    st = opt.optimizer.state[p]
    assert set(st) == {"exp_avg", "exp_avg_sq", "step"}


@check("distopt_load_state")
def _():
    class FakeInner:
        def __init__(self):
            self.p = torch.nn.Parameter(torch.zeros(3))
            self.param_groups = [{"params": [self.p], "step": 5}]
            self.state = {self.p: {"step": torch.tensor(1.0)}}

    class FakeOpt:
        optimizer = FakeInner()
    opt = FakeOpt()
    cpu_support.fix_optimizer_step_after_load(opt)
    assert float(opt.optimizer.state[opt.optimizer.p]["step"]) == 5.0
    assert "step" not in opt.optimizer.param_groups[0]  # a run that never restarted has none


@check("device_arch")
def _():
    from megatron.training import arguments
    from megatron.training.utils import common_utils

    assert arguments.get_device_arch_version() == 0 == common_utils.get_device_arch_version()
    try:
        cpu_support.originals["common_utils.get_device_arch_version"]()
    except (AssertionError, RuntimeError) as e:
        assert "CUDA" in str(e)
    else:
        raise AssertionError("the original asked no CUDA device")


@check("sequence_parallel_norm")
def _():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               tensor_model_parallel_size=2, sequence_parallel=True)
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.LayerNorm) and config.sequence_parallel
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    plain = WrappedTorchNorm(TransformerConfig(num_layers=1, hidden_size=8,
                                               num_attention_heads=2), 8)
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())
    try:
        cpu_support.originals["WrappedTorchNorm.__new__"](WrappedTorchNorm, config, 8)
    except AssertionError as e:
        assert "sequence parallel not supported" in str(e)
    else:
        raise AssertionError("the unpatched WrappedTorchNorm accepted sequence parallel")


@check("ft_warmup_iters")
def _():
    import inspect

    from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient

    init = RankMonitorClient.init_workload_monitoring
    assert "num_warmup_iters" in inspect.signature(init).parameters  # as ft_integration calls it
    original = cpu_support.originals.get("RankMonitorClient.init_workload_monitoring")
    assert original is None or "num_warmup_iters" not in inspect.signature(original).parameters


@check("inprocess_ckpt_queue")
def _():
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    assert isinstance(fa._results_queue, queue.Queue)


@check("refuses_on_cuda")
def _():
    import importlib
    saved = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        importlib.reload(cpu_support).install()
    except RuntimeError as e:
        assert "must not be used on a machine with CUDA" in str(e)
    else:
        raise AssertionError("install() ran although CUDA looked available")
    finally:
        torch.cuda.is_available = saved


json.dump(results, sys.stdout)
