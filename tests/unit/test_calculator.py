"""The MoE configuration calculator: parameter counts, snapshot bytes, window, host memory."""

from dataclasses import replace

import pytest

from megatron_moetion.bench.calculator import (
    compute,
    estimate_fwd_bwd_s,
    format_table,
    main,
    stage_layers,
    stage_operators,
)
from megatron_moetion.bench.presets import (
    DEEPSEEK_MOE_16B,
    DEEPSEEK_V3,
    MIXTRAL_8X7B,
    PRESETS,
    QWEN3_235B,
    QWEN_MOE_14B,
    ModelConfig,
    ParallelLayout,
    Preset,
)
from megatron_moetion.operators import OpKind

PRESET_LIST = list(PRESETS.values())
IDS = list(PRESETS)


@pytest.mark.parametrize(("preset", "billions"), [
    (DEEPSEEK_MOE_16B, 16.4), (MIXTRAL_8X7B, 46.7), (DEEPSEEK_V3, 671.0),
    (QWEN3_235B, 235.0)])
def test_parameter_counts_match_the_published_sizes(preset, billions):
    assert preset.model.main_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_deepseek_v3_with_its_mtp_module_is_685b_as_published():
    # the published 685B stores the MTP module's own copies of the embedding and output head,
    # which Megatron shares with the main model (so they are not counted twice here)
    m = DEEPSEEK_V3.model
    assert (m.total_params + 2 * m.embedding_params) / 1e9 == pytest.approx(685, rel=0.01)
    last = stage_operators(m, DEEPSEEK_V3.layout, DEEPSEEK_V3.layout.pp - 1)
    assert sum(op.name.startswith("mtp0.expert") for op in last) == 256 // 64


def test_qwen_with_its_real_60_experts_is_14_3b():
    real = replace(QWEN_MOE_14B.model, num_experts=60)
    assert real.total_params / 1e9 == pytest.approx(14.3, rel=0.01)
    assert QWEN_MOE_14B.model.num_experts == 64  # the paper's figure


def test_deepseek_v3_mla_attention_is_about_187m_per_layer():
    assert DEEPSEEK_V3.model.attention_params_per_layer / 1e6 == pytest.approx(187, rel=0.01)


@pytest.mark.parametrize("preset", PRESET_LIST, ids=IDS)
def test_stage_operators_cover_every_parameter_once(preset):
    layout = ParallelLayout(tp=1, pp=preset.layout.pp, ep=1, dp=1, gpus_per_node=8,
                            distributed_optimizer=False)
    total = sum(op.num_params for s in range(layout.pp)
                for op in stage_operators(preset.model, layout, s))
    assert total == preset.model.total_params


def test_stage_layers_split_evenly_and_in_order():
    split = stage_layers(DEEPSEEK_MOE_16B.model, 12)
    assert [len(r) for r in split] == [3] * 4 + [2] * 8
    assert [layer for r in split for layer in r] == list(range(1, 29))


def test_operators_are_per_local_expert_router_and_layer():
    p = DEEPSEEK_MOE_16B
    ops = stage_operators(p.model, p.layout, 1)
    layers = len(stage_layers(p.model, p.layout.pp)[1])
    kinds = [op.kind for op in ops]
    assert kinds.count(OpKind.EXPERT) == layers * 64 // p.layout.ep
    assert kinds.count(OpKind.ROUTER) == kinds.count(OpKind.NON_EXPERT) == layers
    assert kinds[0] is OpKind.EXPERT and kinds[-1] is OpKind.ROUTER  # capture order


def test_distributed_optimizer_shards_experts_over_expert_dp():
    p = MIXTRAL_8X7B  # dp 16, ep 8: expert state sharded over 2, the rest over 16
    ops = stage_operators(p.model, p.layout, 1)
    expert = next(op for op in ops if op.kind is OpKind.EXPERT)
    other = next(op for op in ops if op.kind is OpKind.NON_EXPERT)
    assert expert.active_bytes == pytest.approx(12 * expert.num_params / 2, abs=1)
    assert other.active_bytes == pytest.approx(12 * other.num_params / 16, abs=1)
    assert expert.frozen_bytes == pytest.approx(2 * expert.num_params / 2, abs=1)


@pytest.mark.parametrize("window", [2, 3, 4])
@pytest.mark.parametrize("preset", PRESET_LIST, ids=IDS)
def test_sparse_per_iteration_bytes_below_dense(preset, window):
    r = compute(preset, window=window)
    assert r.window == window
    assert r.slot_max_bytes < r.dense_bytes_per_gpu
    assert r.slot_mean_bytes < r.dense_bytes_per_gpu


@pytest.mark.parametrize("preset", [DEEPSEEK_MOE_16B, QWEN_MOE_14B], ids=["deepseek", "qwen"])
def test_64_expert_models_at_w3_copy_at_most_45_percent_per_iteration(preset):
    r = compute(preset, window=3)
    assert r.slot_max_bytes <= 0.45 * r.dense_bytes_per_gpu


def test_window_follows_the_budget():
    p = DEEPSEEK_MOE_16B
    wide = compute(p, bandwidth_gbps=1000.0, fwd_bwd_s=10.0)
    assert wide.window == 1 and wide.slot_max_bytes == wide.dense_bytes_per_gpu and wide.fits
    narrow = compute(p, bandwidth_gbps=25.0, fwd_bwd_s=0.1, replication=0)
    assert narrow.window > 1 and narrow.fits and narrow.binding == "copy"
    assert narrow.slot_max_bytes <= 25e9 * 0.1


def test_replication_over_the_node_network_sets_w_for_the_paper_cluster():
    # 4 A100 per node share 80 Gbps: 2.5 GB/s per GPU; two copies of a dense snapshot take
    # longer than an iteration, so W grows until r windows fit W iterations (about 4)
    r = compute(DEEPSEEK_MOE_16B)
    assert r.copy_window == 1 and r.binding == "network" and r.window == 4 and r.fits
    assert r.replication_s <= r.window * r.fwd_bwd_s
    assert 2 * r.dense_bytes_per_gpu / (r.network_gbps * 1e9) > r.fwd_bwd_s
    faster = compute(DEEPSEEK_MOE_16B, network_gbps=400.0)
    assert faster.window == 1 and faster.binding == "none"
    alone = compute(DEEPSEEK_MOE_16B, replication=0)
    assert alone.window == 1 and alone.replication_s == 0


def test_pcie_shared_by_two_gpus_halves_each_share():
    assert MIXTRAL_8X7B.copy_gbps_per_gpu == MIXTRAL_8X7B.pcie_gbps / 2
    assert compute(MIXTRAL_8X7B).copy_gbps == MIXTRAL_8X7B.pcie_gbps / 2
    with pytest.raises(ValueError, match="gpus_per_pcie_switch"):
        replace(MIXTRAL_8X7B, gpus_per_pcie_switch=9)


@pytest.mark.parametrize("preset", PRESET_LIST, ids=IDS)
def test_host_memory_is_positive_and_consistent(preset):
    r = compute(preset, window=3, replication=2)
    g = preset.layout.gpus_per_node
    assert r.window_bytes >= r.dense_bytes_per_gpu  # every operator ACTIVE once, plus frozen
    assert r.window_bytes == pytest.approx(3 * r.slot_mean_bytes)
    assert r.node_snapshot_bytes == 3 * g * r.window_bytes
    assert r.node_replica_bytes == 2 * 2 * g * r.window_bytes
    assert r.node_dense_bytes == 3 * g * r.dense_bytes_per_gpu
    assert r.node_log_bytes > 0
    assert r.node_moetion_bytes == (r.node_snapshot_bytes + r.node_replica_bytes
                                    + r.node_log_bytes)
    longer = compute(preset, window=6, replication=2)
    assert longer.node_log_bytes == 2 * r.node_log_bytes  # logs kept for 2W iterations
    none = compute(preset, window=3, replication=0)
    assert none.node_replica_bytes == 0 and none.node_dense_bytes == g * r.dense_bytes_per_gpu


def test_no_pipeline_means_no_logs():
    p = replace(DEEPSEEK_MOE_16B, layout=replace(DEEPSEEK_MOE_16B.layout, pp=1))
    assert compute(p, window=2).node_log_bytes == 0


def test_fwd_bwd_estimate_scales_with_micro_batches():
    p = DEEPSEEK_MOE_16B
    assert estimate_fwd_bwd_s(replace(p, num_micro_batches=2 * p.micro_batches)) == (
        pytest.approx(2 * estimate_fwd_bwd_s(p)))


BASE = dict(name="m", num_layers=4, hidden_size=64, num_experts=8, expert_ffn_hidden=32, topk=2,
            vocab_size=100)


@pytest.mark.parametrize(("changes", "field"), [
    ({"num_layers": 0}, "num_layers"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"topk": 9}, "topk"),
    ({"dense_layers": 4}, "dense_layers"),
    ({"dense_layers": 1}, "dense_ffn_hidden"),
    ({"attention_params": 0}, "attention_params"),
    ({"shared_expert_ffn": -5}, "shared_expert_ffn"),
])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**BASE, **changes})


@pytest.mark.parametrize(("changes", "field"), [
    ({"tp": 0}, "tp"), ({"ep": 3}, "ep"), ({"gpus_per_node": 0}, "gpus_per_node")])
def test_bad_layout_names_the_field(changes, field):
    kwargs = {"tp": 1, "pp": 2, "ep": 2, "dp": 4, "gpus_per_node": 8, **changes}
    with pytest.raises(ValueError, match=field):
        ParallelLayout(**kwargs)


def test_bad_preset_and_arguments_name_the_field():
    model = ModelConfig(**BASE)
    with pytest.raises(ValueError, match="num_experts"):
        Preset(model, ParallelLayout(tp=1, pp=2, ep=3, dp=3, gpus_per_node=8))
    with pytest.raises(ValueError, match="pp"):
        Preset(model, ParallelLayout(tp=1, pp=8, ep=1, dp=1, gpus_per_node=8))
    with pytest.raises(ValueError, match="mfu"):
        Preset(model, ParallelLayout(tp=1, pp=2, ep=1, dp=1, gpus_per_node=8), mfu=0)
    p = DEEPSEEK_MOE_16B
    for kwargs, field in (({"bandwidth_gbps": 0}, "bandwidth_gbps"), ({"window": 0}, "window"),
                          ({"fwd_bwd_s": -1.0}, "fwd_bwd_s"), ({"replication": -1},
                                                               "replication")):
        with pytest.raises(ValueError, match=field):
            compute(p, **kwargs)


def test_table_and_main(capsys):
    rows = [compute(p) for p in PRESET_LIST]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert all(p.model.name in table for p in PRESET_LIST)
    assert table.isascii()
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "W = 3" in out and "DeepSeek-V3" in out and "Qwen3-235B" in out
    assert "W=4, binding constraint network" in out
