"""benchmarks/bench_apg_vs_ppo.py's settings of the APG runs (the benchmark itself is run by hand: speed is
never asserted in tests)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_apg_vs_ppo.py"
_spec = importlib.util.spec_from_file_location("bench_apg_vs_ppo", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_param_goes_under_algo_params_and_set_names_any_field():
    assert bench.apg_overrides(["reuse.epochs=4", "gamma=0.99"], ["num_envs=8", "policy.log_std_init=-1"]) == {
        "algo_params.reuse.epochs": 4, "algo_params.gamma": 0.99, "num_envs": 8, "policy.log_std_init": -1}


def test_values_read_as_diffgym_train_reads_them():
    assert bench.apg_overrides(["segment.length=adaptive", "value.bootstrap=none", "policy_gradient.lr=1e-3"], []) == {
        "algo_params.segment.length": "adaptive", "algo_params.value.bootstrap": "none",
        "algo_params.policy_gradient.lr": 1e-3}


@pytest.mark.parametrize("flag", ["--apg-param", "--apg-set"])
def test_a_setting_without_a_value_is_refused_in_one_line(flag, capsys):
    with pytest.raises(SystemExit):
        bench.main([flag, "num_envs"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} takes KEY=VALUE, got 'num_envs'" in err


@pytest.mark.parametrize("setting", ["total_env_steps=100", "eval_episodes=4", "run_dir=/tmp/x"])
def test_what_every_run_shares_cannot_be_set_for_apg_alone(setting, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--apg-set", setting])
    assert "the benchmark sets it for every run" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, setting, message", [("--apg-set", "num_envs=abc", "num_envs must be an integer"),
                                                    ("--apg-param", "policy_gradient.lr_decay=0", "lr_decay must be"),
                                                    ("--apg-set", "nosuch=1", "nosuch")])
def test_a_bad_apg_setting_is_one_line_before_any_run(flag, setting, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", flag, setting])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "error: APG's settings on" in err[-1] and "Traceback" not in "\n".join(err)
