"""MoEtionConfig: flags, defaults, validation messages."""

import argparse
import re

import pytest

from megatron_moetion import config
from megatron_moetion.errors import ConfigError, FaultPlanError

EXPECTED_FLAGS = {
    "--moetion", "--moetion-window", "--moetion-replication-factor",
    "--moetion-copy-bandwidth-gbps", "--moetion-network-bandwidth-gbps", "--moetion-rack-id",
    "--moetion-copy-interleave", "--moetion-copy-chunk-mb", "--moetion-iter-time-s", "--moetion-upstream-logging",
    "--moetion-fault-plan", "--moetion-metrics-file", "--moetion-persist-dir",
    "--moetion-oracle-dir", "--moetion-reorder-threshold", "--moetion-reorder-fraction",
    "--moetion-popularity-window-iters", "--moetion-replication-chunk-mb", "--moetion-timeout-s",
    "--moetion-heartbeat-interval-s", "--moetion-detect-timeout-s",
    "--moetion-host-memory-cap-mb", "--moetion-oracle-interval",
    # testing and debugging
    "--moetion-node-id", "--moetion-debug-dump-dir", "--moetion-debug-recovery-delay-s", "--moetion-negative-control",
    "--moetion-bench-baseline",
}


def parse(*argv):
    return config.from_args(config.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_flag_set_is_frozen():
    parser = config.add_arguments(argparse.ArgumentParser())
    flags = {opt for action in parser._actions for opt in action.option_strings
             if opt.startswith("--moetion")}
    flags = {f for f in flags if not f.startswith("--no-")}
    assert flags == EXPECTED_FLAGS, "a --moetion flag was added or removed: update EXPECTED_FLAGS"


def test_defaults_keep_moetion_off():
    cfg = parse()
    assert cfg.enabled is False and cfg.window == 0 and cfg.replication_factor == 2
    assert cfg.upstream_logging is True


def test_flags_round_trip():
    cfg = parse("--moetion", "--moetion-window", "3", "--moetion-replication-factor", "1",
                "--no-moetion-upstream-logging")
    assert (cfg.enabled, cfg.window, cfg.replication_factor, cfg.upstream_logging) == (
        True, 3, 1, False)


BAD = [
    (["--moetion", "--moetion-window", "-1"], "--moetion-window",
     r"an integer >= 0 \(0 = automatic\)"),
    (["--moetion", "--moetion-replication-factor", "-2"], "--moetion-replication-factor",
     "an integer >= 0"),
    (["--moetion", "--moetion-reorder-fraction", "1.5"], "--moetion-reorder-fraction",
     r"in \(0, 1\]"),
    (["--moetion", "--moetion-timeout-s", "0"], "--moetion-timeout-s", "> 0"),
    (["--moetion", "--moetion-replication-chunk-mb", "0"], "--moetion-replication-chunk-mb",
     "an integer >= 1"),
]


@pytest.mark.parametrize("argv, flag, allowed", BAD)
def test_bad_values_are_refused_at_parse_time_naming_flag_and_range(argv, flag, allowed, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert re.search(rf"argument {flag}: must be {allowed}; got", capsys.readouterr().err)


@pytest.mark.parametrize("argv, flag, allowed", BAD)
def test_bad_values_in_code_raise_config_error(argv, flag, allowed):
    name = flag.removeprefix("--moetion-").replace("-", "_")
    value = type(getattr(config.MoEtionConfig(), name))(argv[-1])
    with pytest.raises(ConfigError, match=rf"^{flag} must be {allowed}; got"):
        config.MoEtionConfig(enabled=True, **{name: value})


def test_bad_value_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse("--moetion", "--moetion-window", "three")
    assert "--moetion-window" in capsys.readouterr().err


def test_fault_plan_needs_moetion():
    with pytest.raises(ConfigError, match="--moetion-fault-plan needs --moetion"):
        parse("--moetion-fault-plan", "rank=0,iter=3")


def test_fault_plan_from_environment(monkeypatch):
    monkeypatch.setenv(config.ENV_FAULT_PLAN, "rank=1,iter=4,phase=fwd")
    assert parse("--moetion").fault_plan == "rank=1,iter=4,phase=fwd"
    # the flag wins over the environment
    assert parse("--moetion", "--moetion-fault-plan", "rank=0,iter=2").fault_plan == "rank=0,iter=2"


def test_malformed_fault_plan_is_rejected_before_training(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse("--moetion", "--moetion-fault-plan", "rank=1,iter=4,phase=sideways")
    assert "phase must be one of" in capsys.readouterr().err
    monkeypatch.setenv(config.ENV_FAULT_PLAN, "rank=1,iter=4,phase=sideways")
    with pytest.raises(FaultPlanError, match="phase must be one of"):
        parse("--moetion")


def test_readme_configuration_table_lists_every_flag():
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    tables = [t for t in section.split("\n\n") if t.startswith("| flag")]
    assert len(tables) == 2, "the flags table and the testing flags table"
    fields = dataclasses.fields(config.MoEtionConfig)
    for table, testing in zip(tables, (False, True)):
        listed = set(re.findall(r"^\| `(--moetion[a-z0-9-]*)`", table, flags=re.M))
        assert listed == {config.flag_name(f) for f in fields
                          if bool(f.metadata.get("testing")) == testing}


def test_testing_settings_are_flags_not_environment_switches():
    cfg = parse("--moetion", "--moetion-negative-control", "skip_conversion,keep_checks",
                "--moetion-node-id", "node{rank}")
    assert cfg.negative_controls == {"skip_conversion", "keep_checks"}
    with pytest.raises(ConfigError, match="--moetion-negative-control must be a comma-separated"):
        config.MoEtionConfig(enabled=True, negative_control="skip_everything")
    with pytest.raises(ConfigError, match="--moetion-node-id needs --moetion"):
        config.MoEtionConfig(node_id="x")
