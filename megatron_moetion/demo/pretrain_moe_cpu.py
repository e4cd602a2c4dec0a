"""torchrun entry point: Megatron's own ``pretrain()`` for an MoE GPT, on CPU with gloo or on GPU.

Megatron's ``pretrain_gpt.py`` is not in the megatron-core wheel, so this is the small
equivalent the CPU demo, the tests and the GPU check (``bench.gpu_check``) run: MCore
``GPTModel`` with the local layer spec, mock data, every Megatron flag passed through. The CPU
support (``testing.cpu_support``) is installed only where there is no CUDA; on a GPU only the
wheel's own workarounds are (``cpu_support.install_for_this_machine``). It must run against
the *patched* Megatron tree (``build/megatron-patched`` first on ``PYTHONPATH``;
``python -m megatron_moetion.demo`` sets that up)::

    torchrun --nproc-per-node 4 -m megatron_moetion.demo.pretrain_moe_cpu <megatron flags>

With reserve ranks (``RunConfig.spares``), the processes are started one per rank and reserve
rank, as srun starts them (``testing.launch.run_with_reserves``), and Megatron's
``--inprocess-restart`` replaces a dead rank in place (``adapter.nvrx_restart``).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's stack dump on timeout

import torch  # noqa: E402

torch.set_num_threads(1)

from megatron_moetion.testing import cpu_support  # noqa: E402

cpu_support.install_for_this_machine()

from functools import partial  # noqa: E402

from megatron.core import parallel_state as mpu  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.utils import get_batch_on_this_tp_rank  # noqa: E402
from megatron.training import get_args, get_tokenizer, pretrain  # noqa: E402
from megatron.training.argument_utils import (  # noqa: E402
    core_transformer_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

from megatron_moetion import megatron_hooks  # noqa: E402


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts,
                                    moe_grouped_gemm=args.moe_grouped_gemm)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, vp_stage=vp_stage,
        pg_collection=pg_collection)


def get_batch(data_iterator, vp_stage=None):
    """CP=1: only the first and last pipeline stages read data; with TP > 1 only TP rank 0
    reads it and broadcasts it to the others, as pretrain_gpt.py does."""
    first = mpu.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = mpu.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if not (first or last):
        return None, None, None, None, None
    if mpu.get_tensor_model_parallel_world_size() == 1:
        batch = next(data_iterator)
    else:
        args = get_args()
        tp_rank = mpu.get_tensor_model_parallel_rank()
        batch = get_batch_on_this_tp_rank(
            next(data_iterator) if tp_rank == 0 else {},
            broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
            broadcast_group=mpu.get_tensor_model_parallel_group(), has_cu_seqlens=False,
            is_hybrid_cp=False, create_attention_mask_in_dataloader=False, cp_size=1,
            tp_rank=tp_rank, micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length, mtp_on_this_rank=False,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            is_pipeline_first_stage=first, is_pipeline_last_stage=last)
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    reporting_loss = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": reporting_loss}


def forward_step(data_iterator, model, return_schedule_plan=False):
    vp_stage = getattr(model, "vp_stage", None)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels,
                          loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=None,
        blend_per_split=None, split="969,30,1", path_to_cache=None, tokenizer=get_tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(
        MockGPTDataset, train_val_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0, config).build()


train_valid_test_datasets_provider.is_distributed = True


def _driver_options() -> None:
    """Options of this driver, not Megatron's, taken off the command line before Megatron
    parses it: ``--test-optimizer group-step-adam`` trains with an Adam that keeps ``step`` per
    parameter group, as FusedAdam does (``testing.group_step_adam``)."""
    if "--test-optimizer" not in sys.argv:
        return
    i = sys.argv.index("--test-optimizer")
    name = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
    del sys.argv[i:i + 2]
    if name != "group-step-adam":
        raise SystemExit(f"--test-optimizer must be group-step-adam; got {name!r}")
    import megatron.core.optimizer as optimizer_factory
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    from megatron_moetion.testing.group_step_adam import GroupStepAdam

    # what Megatron's modules set where Apex is installed: the factory builds FusedAdam, and
    # the distributed optimizer's checkpoint keeps the group-level step
    optimizer_factory.Adam = GroupStepAdam
    optimizer_factory.USING_PYTORCH_OPTIMIZER = False
    distrib_optimizer.HAVE_APEX_OR_TE = True
    distrib_optimizer.USING_APEX_OPTIMIZER = True


def main() -> None:
    import megatron.training.training as training

    _driver_options()

    if getattr(training, "megatron_hooks", None) is not megatron_hooks:
        raise RuntimeError(
            f"{training.__file__} is not patched for MoEtion; run `make patched-megatron` and "
            f"put build/megatron-patched first on PYTHONPATH (python -m megatron_moetion.demo "
            f"does both)")
    from megatron.training import inprocess_restart

    # as pretrain_gpt.py's main: --inprocess-restart goes through the patched
    # maybe_wrap_for_inprocess_restart (nvidia-resiliency-ext's Wrapper, adapter.nvrx_restart)
    wrapped, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    args = parse_and_validate_args(args_defaults={})
    wrapped(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder, forward_step, model_provider=model_provider,
            store=store)


if __name__ == "__main__":
    main()
