"""Operator discovery on real MCore GPT models: every parameter in exactly one operator."""

import pytest

from megatron_moetion.testing.dist import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(300)]

SPECS = {
    "moe_every_layer": dict(),
    "dense_and_moe_layers": dict(moe_layer_freq=[0, 1, 0, 1]),
    "shared_experts": dict(moe_shared_expert_intermediate_size=64),
    "expert_bias": dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
    "mtp": dict(mtp_num_layers=1),
    "tied_embeddings": dict(_tied=True),
}


def _discover(rank, world_size, spec_name, ep):
    from megatron_moetion.testing import cpu_support

    cpu_support.install(training=False)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from megatron_moetion.adapter.discovery import discover_operators
    from megatron_moetion.operators import OpKind, check_disjoint_cover

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(123)
    extra = dict(SPECS[spec_name])
    tied = extra.pop("_tied", False)
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128,
        use_cpu_initialization=True, add_bias_linear=False, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep, **extra)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    mtp = (get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
           if config.mtp_num_layers else None)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=128,
                     max_sequence_length=32, share_embeddings_and_output_weights=tied,
                     position_embedding_type="rope", mtp_block_spec=mtp)
    ops = discover_operators([model])
    names = {n for n, _ in model.named_parameters()}
    check_disjoint_cover({op.name: [f"{p.name.split('.', 1)[1]}[{p.start}:{p.end}]"
                                    for p in op.pieces] for op in ops},
                         [f"{n}[0:{p.numel()}]" for n, p in model.named_parameters()])
    parallel_state.destroy_model_parallel()
    kinds = {}
    for op in ops:
        kinds.setdefault(op.kind.value, []).append(op.name)
    return {"kinds": kinds, "params": len(names),
            "router_buffers": sorted(b for op in ops if op.kind is OpKind.ROUTER
                                     for b, _ in op.buffers),
            "experts": sorted(op.expert_id for op in ops if op.kind is OpKind.EXPERT)}


@pytest.mark.parametrize("spec_name", SPECS)
def test_every_parameter_in_exactly_one_operator(spec_name):
    (out,) = run_ranks(_discover, 1, spec_name, 1, timeout_s=120)
    kinds = out["kinds"]
    assert set(kinds) >= {"expert", "router", "non_expert", "embedding", "output"}
    moe_layers = 2 if spec_name == "dense_and_moe_layers" else 4
    assert len(kinds["router"]) == moe_layers and len(kinds["expert"]) == 8 * moe_layers
    assert len(kinds["non_expert"]) == 4
    if spec_name == "mtp":
        assert kinds["mtp"] == ["mtp0"]
    if spec_name == "expert_bias":
        assert any(b.endswith("router.expert_bias") for b in out["router_buffers"])
        assert any(b.endswith("router.local_tokens_per_expert") for b in out["router_buffers"])


def test_expert_ids_are_global_under_expert_parallelism():
    outs = run_ranks(_discover, 2, "moe_every_layer", 2, timeout_s=120)
    assert [sorted(set(o["experts"])) for o in outs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
