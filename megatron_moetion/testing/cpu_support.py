"""Run megatron-core 0.19.2 (core and ``megatron/training``) on a CPU-only torch with gloo.

Only for CPU demos and tests: ``install()`` refuses to run where CUDA is available, and nothing
in the package calls it implicitly. Call it in every worker process before anything from
``megatron`` is imported. Each workaround below names the Megatron file it covers; a test per
workaround lives in ``tests/megatron/test_cpu_support.py``. ``MOETION_CPU_DISABLE=a,b`` turns
single workarounds off, to see what breaks without them.

Workarounds for ``megatron/core``: nvrx_version, paged_stash, rng, streams, current_device,
moe_dtoh, sequence_parallel_norm, device_mode. For ``megatron/training``: typing_override, allow_no_cuda, device_count,
device_arch, compile_helpers. For loading a DistributedOptimizer checkpoint with the torch.optim fallback
(no Apex/TE, so also on GPU without them; ``testing.distopt_loading``): distopt_step_key,
distopt_init_state, distopt_load_state. Speed only: inprocess_ckpt_queue. For ``--inprocess-restart``:
inprocess_nccl_init. For ``--enable-ft-package`` with nvidia-resiliency-ext 0.4.1: ft_warmup_iters.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
import typing

import torch
from torch.overrides import TorchFunctionMode

from megatron_moetion.testing import distopt_loading
from megatron_moetion.testing.distopt_loading import (  # noqa: F401  (the probe's names)
    fix_optimizer_step_after_load,
    init_optimizer_state_for_loading,
)

ENV_DISABLE = "MOETION_CPU_DISABLE"
WORKAROUNDS = (
    "nvrx_version", "paged_stash", "rng", "streams", "current_device", "moe_dtoh",
    "sequence_parallel_norm", "device_mode",
    "typing_override", "allow_no_cuda", "device_count", "device_arch", "compile_helpers",
    "distopt_step_key", "distopt_init_state", "distopt_load_state", "inprocess_ckpt_queue",
    "inprocess_nccl_init", "ft_warmup_iters",
)

applied: list[str] = []
originals: dict[str, object] = {}
_mode: TorchFunctionMode | None = None


def _enabled(name: str) -> bool:
    return name not in set(filter(None, os.environ.get(ENV_DISABLE, "").split(",")))


# --- megatron/core/dist_checkpointing/strategies/nvrx.py: megatron-core 0.19.2 asserts
#     nvidia-resiliency-ext >= 0.6.0 and reads ``nvidia_resiliency_ext.__version__``, which 0.4.1
#     (the newest build for Python 3.11, which the tests use for its in-process restart) lacks:
#     `import megatron.core` raises. Hide only nvrx's async checkpointing core from it (Megatron
#     then uses its own async checkpointing), where the installed nvrx has no version.
def _hide_old_nvrx_async_ckpt() -> None:
    try:
        import nvidia_resiliency_ext as nvrx
    except ImportError:
        return
    if getattr(nvrx, "__version__", None) is None:
        sys.modules.setdefault("nvidia_resiliency_ext.checkpointing.async_ckpt.core", None)


# --- megatron/core/transformer/moe/ops/paged_stash.py: `import triton` at module level, reached
#     from `import megatron.core` via pipeline_parallel/schedules.py. Register a stub module
#     (only where triton is really absent) whose kernels raise if ever called.
def _stub_paged_stash() -> None:
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib_find("triton"):
        return
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _no_kernel(*_args, **_kwargs):
        raise RuntimeError("MoE paged-stash triton kernels are not available on CPU")

    stub.paged_stash_copy_kernel = _no_kernel
    stub.paged_stash_pop_kernel = _no_kernel
    sys.modules[name] = stub


def importlib_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- megatron/core/tensor_parallel/random.py: CudaRNGStatesTracker.add/fork and
#     model_parallel_cuda_manual_seed call torch.cuda.{get,set}_rng_state/manual_seed and the
#     module helpers _get_cuda_rng_state/_set_cuda_rng_state. Map the "CUDA" generator onto the
#     CPU default generator, which is what CPU dropout draws from; the tracker still keeps a
#     separate state per named stream (TP, EP, data-parallel).
def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as rng

    originals["rng._get_cuda_rng_state"] = rng._get_cuda_rng_state
    rng._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state())
    rng._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)


# --- torch.cuda.Stream/Event/synchronize, used by transformer/moe/token_dispatcher.py
#     (MoEAlltoAllTokenDispatcher), distributed/param_and_grad_buffer.py (start_grad_sync) and
#     pipeline_parallel/p2p_communication.py (_communicate). Null objects: on CPU every op is
#     synchronous, so there is nothing to wait for.
class NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = NullStream()


def _patch_streams() -> None:
    originals["torch.cuda.synchronize"] = torch.cuda.synchronize
    torch.cuda.Stream = NullStream
    torch.cuda.Event = NullEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# --- torch.cuda.current_device(): about 200 allocation sites in megatron/core, first hit in
#     distributed/param_and_grad_buffer.py _ParamAndGradBuffer.__init__; "cpu" is accepted
#     wherever a device is.
def _patch_current_device() -> None:
    originals["torch.cuda.current_device"] = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"


# --- megatron/core/transformer/moe/moe_utils.py maybe_move_tensor_to_cpu converts to numpy
#     only for CUDA tensors, so on CPU the alltoall dispatcher hands tensors as split sizes to
#     ProcessGroup.all_to_all_single (TypeError). token_dispatcher.py imports it by name.
def _patch_moe_dtoh() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    originals["moe_utils.maybe_move_tensor_to_cpu"] = original

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --- Hard-coded device="cuda", .cuda() and 'torch.cuda.FloatTensor' type checks across
#     megatron/core and megatron/training: optimizer/optimizer.py (FP32Optimizer._scale),
#     optimizer/clip_grads.py (get_grad_norm_fp32, clip_grad_by_total_norm_fp32 asserting
#     grad.type() == 'torch.cuda.FloatTensor'), optimizer/distrib_optimizer.py (param.type()
#     dispatch), pipeline_parallel/schedules.py, models/common/language_module, and
#     training/training.py (get_model's .cuda(), device='cuda' tensors). A TorchFunctionMode
#     maps CUDA devices to CPU, makes .cuda()/.pin_memory() no-ops and reports CPU tensors'
#     .type() with the CUDA name.
def to_cpu_device(device):
    if device is None:
        return device
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str):
        return torch.device("cpu") if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # a CPU-only torch build has no pinned allocator
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if args[0].is_cuda else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = to_cpu_device(kwargs["device"])
        if (func is torch.Tensor.to and len(args) > 1
                and not isinstance(args[1], torch.Tensor | torch.dtype)):
            args = (args[0], to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


# --- megatron/training/models/*.py use typing.override (Python 3.12); they are imported by
#     megatron/training/config/container.py from training.py. A pass-through decorator.
def _patch_typing_override() -> None:
    if not hasattr(typing, "override"):
        typing.override = lambda func: func


# --- megatron/training/initialize.py initialize_megatron asserts torch.cuda.is_available()
#     unless allow_no_cuda=True, and training.py pretrain() calls it without that flag.
def _patch_allow_no_cuda() -> None:
    import megatron.training.training as training

    originals["training.initialize_megatron"] = training.initialize_megatron
    training.initialize_megatron = functools.partial(
        training.initialize_megatron, allow_no_cuda=True)


# --- megatron/training/initialize.py _initialize_distributed calls
#     mpu.initialize_model_parallel, and _set_random_seed calls model_parallel_cuda_manual_seed,
#     only if torch.cuda.device_count() > 0. Report one device; set_device is a no-op.
def _patch_device_count() -> None:
    originals["torch.cuda.device_count"] = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None


# --- megatron/training/initialize.py _compile_dependencies -> megatron/core/datasets/utils.py
#     compile_helpers runs `make` in megatron/core/datasets, but the wheel ships the prebuilt
#     helpers_cpp extension and no Makefile (sys.exit(1) on rank 0). Not CPU-specific.
def _patch_compile_helpers() -> None:
    import megatron.core.datasets.utils as dataset_utils
    from megatron.core.datasets import helpers_cpp  # noqa: F401  (the prebuilt .so must import)

    originals["datasets.compile_helpers"] = dataset_utils.compile_helpers
    dataset_utils.compile_helpers = lambda: None


# --- Speed only: megatron/core/dist_checkpointing/strategies/filesystem_async.py
#     get_write_results_queue starts a spawn-context Manager (a fresh interpreter per rank,
#     about 9 s on 2 cores) on the first save. A plain queue is enough without --async-save.
def _patch_inprocess_ckpt_queue() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


# --- megatron/training/inprocess_restart.py maybe_force_nccl_backend_init: with
#     --inprocess-restart, initialize_megatron all-reduces a tensor on the device and calls
#     torch.cuda.synchronize() to force NCCL's lazy init; gloo needs no forcing, and the CPU
#     build has no synchronize.
def _patch_inprocess_nccl_init() -> None:
    from megatron.training import inprocess_restart

    originals["inprocess_restart.maybe_force_nccl_backend_init"] = (
        inprocess_restart.maybe_force_nccl_backend_init)
    inprocess_restart.maybe_force_nccl_backend_init = lambda device_id: None


# --- megatron/training/ft_integration.py setup: --enable-ft-package calls
#     RankMonitorClient.init_workload_monitoring(num_warmup_iters=...), a parameter of
#     nvidia-resiliency-ext 0.6.0 that 0.4.1 (the newest build for Python 3.11) lacks: a
#     TypeError. Where the installed client lacks it, accept and drop it (Megatron opens the
#     "step" section only after its warm-up iterations anyway, on the client side).
def _patch_ft_warmup_iters() -> None:
    import inspect

    try:
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
    except ImportError:
        return
    init = RankMonitorClient.init_workload_monitoring
    if "num_warmup_iters" in inspect.signature(init).parameters:
        return
    originals["RankMonitorClient.init_workload_monitoring"] = init

    def init_workload_monitoring(self, num_warmup_iters=None):  # no functools.wraps: its
        return init(self)  # __wrapped__ would make the signature look unchanged

    RankMonitorClient.init_workload_monitoring = init_workload_monitoring


# --- megatron/core/transformer/torch_norm.py WrappedTorchNorm (the norm of the local layer
#     spec without TE/Apex) asserts "sequence parallel not supported by torch LayerNorm", and
#     MoELayer refuses TP > 1 without sequence parallel, so MoE with TP > 1 cannot run on CPU.
#     A torch norm is correct under sequence parallel if, as TE's and Apex's norms do
#     (fusions/fused_layer_norm.py), its weight and bias are marked ``sequence_parallel``: then
#     finalize_model_grads._allreduce_non_tensor_model_parallel_grads sums their gradients over
#     the TP group (each TP rank normalizes its own slice of the sequence). Build the norm as
#     for a config without sequence parallel, and mark its parameters.
def _patch_sequence_parallel_norm() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__
    originals["WrappedTorchNorm.__new__"] = original

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


_CORE = (
    ("rng", _patch_rng), ("streams", _patch_streams),
    ("current_device", _patch_current_device), ("moe_dtoh", _patch_moe_dtoh),
    ("sequence_parallel_norm", _patch_sequence_parallel_norm),
)
# --- megatron/training/arguments.py validate_args: with TP > 1 (or CP > 1) it asks
#     get_device_arch_version() (megatron/training/utils/common_utils.py, imported by name),
#     which reads torch.cuda.get_device_properties: "Torch not compiled with CUDA enabled". No
#     device is a pre-Blackwell one (0): validation then asks CUDA_DEVICE_MAX_CONNECTIONS=1, as
#     on Hopper (the CPU runner sets it, as scripts/pretrain_gpt.sh does).
def _patch_device_arch() -> None:
    from megatron.training import arguments
    from megatron.training.utils import common_utils

    originals["common_utils.get_device_arch_version"] = common_utils.get_device_arch_version
    common_utils.get_device_arch_version = arguments.get_device_arch_version = lambda: 0


_TRAINING = (
    ("allow_no_cuda", _patch_allow_no_cuda), ("device_count", _patch_device_count),
    ("device_arch", _patch_device_arch),
    ("compile_helpers", _patch_compile_helpers),
    ("distopt_step_key", lambda: distopt_loading.patch_distopt_step_key(originals)),
    ("distopt_init_state", lambda: distopt_loading.patch_distopt_init_state(originals)),
    ("distopt_load_state", lambda: distopt_loading.patch_distopt_load_state(originals)),
    ("inprocess_ckpt_queue", _patch_inprocess_ckpt_queue),
    ("inprocess_nccl_init", _patch_inprocess_nccl_init),
    ("ft_warmup_iters", _patch_ft_warmup_iters),
)


def install_portable() -> list[str]:
    """The workarounds the megatron-core wheel needs on any machine, GPU included (what a GPU
    run of the CPU driver installs instead of ``install``): nvrx_version and paged_stash (each
    a no-op where its package is as Megatron expects), typing_override (a no-op on Python
    3.12) and compile_helpers (the wheel ships no Makefile). Return the names applied."""
    _apply((("nvrx_version", _hide_old_nvrx_async_ckpt), ("paged_stash", _stub_paged_stash),
            ("typing_override", _patch_typing_override),
            ("compile_helpers", _patch_compile_helpers)))
    return list(applied)


def install_for_this_machine() -> list[str]:
    """What a Megatron driver calls first: ``install`` where there is no CUDA,
    ``install_portable`` where there is."""
    return install_portable() if torch.cuda.is_available() else install()


def _apply(steps) -> None:
    """Run each enabled ``(name, patch)`` not applied yet, once."""
    for name, patch in steps:
        if name not in applied and _enabled(name):
            patch()
            applied.append(name)


def install(*, training: bool = True, force: bool = False) -> list[str]:
    """Apply every enabled workaround once; return the names applied.

    Args:
        training: also apply the ``megatron/training`` workarounds (imports it).
        force: install even where CUDA is available (only for this package's own tests).

    Raises:
        RuntimeError: CUDA is available and ``force`` is not set.
    """
    global _mode
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "megatron_moetion.testing.cpu_support.install() makes Megatron run on the CPU and "
            "must not be used on a machine with CUDA; it is only for CPU demos and tests."
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _apply((("nvrx_version", _hide_old_nvrx_async_ckpt), ("paged_stash", _stub_paged_stash)))
    import megatron.core  # noqa: F401  (needs the stub above)

    steps = list(_CORE)
    if training:
        _apply((("typing_override", _patch_typing_override),))
        steps += list(_TRAINING)
    _apply(steps)
    if _mode is None and _enabled("device_mode"):
        _mode = CudaToCpuMode()
        _mode.__enter__()
        applied.append("device_mode")
    return list(applied)
