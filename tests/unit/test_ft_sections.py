"""A MoEtion recovery runs outside the fault-tolerance package's "step" section."""

from types import SimpleNamespace

import pytest

from megatron_moetion.adapter.ft_sections import outside_the_step_section


class RecordingClient:
    def __init__(self):
        self.calls = []

    def start_section(self, name):
        self.calls.append(("start", name))

    def end_section(self, name):
        self.calls.append(("end", name))


def ft_module(client, seen_iterations, warmup=5):
    return SimpleNamespace(get_rank_monitor_client=lambda: client,
                           _seen_tr_iters_cnt=seen_iterations, _NUM_WARMUP_ITERS=warmup)


def test_the_step_section_closes_around_a_recovery_and_opens_again():
    client = RecordingClient()
    with outside_the_step_section(ft_module(client, seen_iterations=9)):
        client.calls.append(("recovery", ""))
    assert client.calls == [("end", "step"), ("recovery", ""), ("start", "step")]


def test_it_opens_again_when_the_recovery_fails():
    client = RecordingClient()
    with pytest.raises(RuntimeError), outside_the_step_section(ft_module(client, 9)):
        raise RuntimeError("recovery failed")
    assert client.calls == [("end", "step"), ("start", "step")]


def test_nothing_during_the_warm_up_iterations_or_without_ft():
    client = RecordingClient()
    with outside_the_step_section(ft_module(client, seen_iterations=2)):
        pass
    assert client.calls == []
    with outside_the_step_section(ft_module(None, seen_iterations=9)):
        pass


@pytest.mark.megatron
def test_megatron_ft_integration_has_what_the_section_logic_reads():
    import subprocess
    import sys

    code = ("from megatron_moetion.testing import cpu_support; cpu_support.install();"
            "from megatron.training import ft_integration as ft;"
            "from megatron_moetion.adapter.ft_sections import outside_the_step_section;"
            "assert isinstance(ft._seen_tr_iters_cnt, int) and ft._NUM_WARMUP_ITERS >= 0;"
            "assert ft.get_rank_monitor_client() is None\n"
            "with outside_the_step_section(): pass\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
