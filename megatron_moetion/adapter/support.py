"""Which Megatron configurations MoEtion can snapshot and replay exactly; clear errors otherwise.

Checked against Megatron's ``args`` at the end of Megatron's ``validate_args`` (through
``megatron_hooks.validate_args``), before any model is built, and again when the session is set
up: each refusal names the flag and says why.

A failed pipeline stage replays on its own from the upstream logs, so whatever couples the
gradients of two stages inside ``finalize_model_grads``
(``megatron/core/distributed/finalize_model_grads.py``) is refused. In megatron-core 0.19.2 the
cross-stage collectives there are the word-embedding all-reduce between the first and the last
stage (tied embeddings, or MTP), and the token-count broadcast of ``--calculate-per-token-loss``.
The others stay inside one stage: position embeddings (their group is the first stage only),
layer-norm grads with sequence parallelism (TP group), ``_update_router_expert_bias`` and the
quantile-balancing bias (TP x DP x CP and DP x CP groups), and the conditional-embedder and
Flextron router all-reduces are reached only by model configs no Megatron flag sets. (The grad
norm and found-inf flag the optimizer reduces over all stages are recorded and injected during
replay instead: ``adapter/optimizer_probe.py``.)
"""

from __future__ import annotations

from megatron_moetion.config import MoEtionConfig
from megatron_moetion.errors import UnsupportedConfigurationError


def check_supported(args, cfg: MoEtionConfig, restart_engine: str | None = None) -> None:
    """Raise ``UnsupportedConfigurationError`` for configurations MoEtion cannot handle;
    ``restart_engine``: what replaces dead ranks in this process (``Runtime.restart_engine``)."""
    problems = []

    def refuse(flag: str, why: str) -> None:
        problems.append(f"{flag}: {why}")

    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if pp > 1 and not getattr(args, "untie_embeddings_and_output_weights", False):
        refuse("tied embeddings (add --untie-embeddings-and-output-weights)",
               "with PP > 1 tied embeddings all-reduce gradients between the first and last "
               "stage (finalize_model_grads._allreduce_word_embedding_grads), which a "
               "stage-local replay cannot reproduce")
    if getattr(args, "mtp_num_layers", None) and pp > 1:
        refuse("--mtp-num-layers with --pipeline-model-parallel-size > 1",
               "the MTP stage keeps its own copy of the word embeddings, and whenever "
               "config.mtp_num_layers is set (even with untied embeddings) "
               "finalize_model_grads._allreduce_word_embedding_grads all-reduces its gradient "
               "with the first stage's copy every iteration, which a stage-local replay "
               "cannot reproduce")
    if getattr(args, "calculate_per_token_loss", False) and pp > 1:
        refuse("--calculate-per-token-loss", "broadcasts token counts across pipeline stages "
               "inside the gradient finalisation, which a stage-local replay cannot reproduce")
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        refuse("--cuda-graph-impl", "captured graphs bypass MoEtion's hooks")
    if getattr(args, "optimizer_cuda_graph", False):
        refuse("--optimizer-cuda-graph", "captured graphs bypass MoEtion's hooks")
    if getattr(args, "use_precision_aware_optimizer", False):
        refuse("--use-precision-aware-optimizer", "main weights live inside FusedAdam, where "
               "MoEtion cannot snapshot them per operator")
    if getattr(args, "fp8", None) or getattr(args, "fp4", None):
        refuse("--fp8-format / --fp4-format", "quantized weight caches and scaling state are "
               "not captured yet")
    if getattr(args, "use_megatron_fsdp", False) or getattr(args, "use_torch_fsdp2", False):
        refuse("--use-megatron-fsdp / --use-torch-fsdp2", "only DDP with the distributed or "
               "the plain optimizer is supported")
    if getattr(args, "moe_expert_rank_capacity_factor", None) is not None:
        refuse("--moe-expert-rank-capacity-factor", "its paged-stash runner re-runs "
               "forward-backward outside MoEtion's view")
    if getattr(args, "optimizer", "adam") not in ("adam", "sgd"):
        refuse(f"--optimizer {args.optimizer}", "only Adam and SGD state are captured")
    if getattr(args, "inprocess_restart", False) and restart_engine != "nvrx":
        refuse("--inprocess-restart without the wrapped pretrain()",
               "this entry point did not call megatron.training.inprocess_restart."
               "maybe_wrap_for_inprocess_restart(pretrain) before parsing the arguments (as "
               "pretrain_gpt.py does), so nvidia-resiliency-ext's Wrapper runs without "
               "MoEtion's kept-state handover (adapter.nvrx_restart) and a restart would lose "
               "the survivors' state")
    if getattr(args, "non_persistent_ckpt_type", None):
        refuse(f"--non-persistent-ckpt-type {args.non_persistent_ckpt_type}",
               "a job restarted from a non-persistent checkpoint resumes without MoEtion's "
               "per-rank RNG streams (kept beside persistent checkpoints only), so it would not "
               "continue bitwise; MoEtion's in-memory windows are the fast tier, the "
               "persistent checkpoint (--save) the fallback")
    if problems:
        raise UnsupportedConfigurationError(
            "--moetion cannot protect this configuration:\n  " + "\n  ".join(problems))
