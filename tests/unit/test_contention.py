"""The model of snapshot copies contending with the expert-parallel all-to-all on PCIe."""

from dataclasses import replace

import pytest

from megatron_moetion.bench.contention import format_table, main, model
from megatron_moetion.bench.presets import DEEPSEEK_MOE_16B, DEEPSEEK_V3, PRESETS, QWEN3_235B


def test_expert_parallelism_inside_a_node_has_no_off_node_all_to_all():
    c = model(DEEPSEEK_MOE_16B)  # EP4 on 4-GPU nodes
    assert c.a2a_bytes == 0 and c.burst_extra_s == c.interleaved_extra_s == 0


@pytest.mark.parametrize("preset", [DEEPSEEK_V3, QWEN3_235B], ids=["v3", "qwen3"])
def test_a_burst_slows_the_all_to_all_and_chunks_that_fit_attention_blocks_do_not(preset):
    c = model(preset)
    assert c.a2a_bytes > 0 and c.burst_extra_s > 0
    assert c.chunk_s <= c.attention_block_s and c.chunked_extra_s == 0
    # W = 1: the only slot is the window's last, copied at the close: still a burst
    assert c.window == 1 and c.interleaved_extra_s == c.burst_extra_s


def test_interleaving_helps_in_proportion_to_the_slots_it_covers():
    # eight GPUs per PCIe switch and short iterations: the copy budget needs W > 1
    p = replace(QWEN3_235B, gpus_per_pcie_switch=8, mfu=1.0, seq_len=1024)
    c = model(p)
    assert c.window > 1
    assert c.interleaved_extra_s == pytest.approx(
        (c.burst_extra_s + (c.window - 1) * c.chunked_extra_s) / c.window)
    assert c.interleaved_extra_s < c.burst_extra_s


def test_table_and_main(capsys):
    rows = [model(p) for p in PRESETS.values()]
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert main([]) == 0 and "Qwen3-235B" in capsys.readouterr().out
