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
    assert bench.overrides(["reuse.epochs=4", "gamma=0.99"], ["num_envs=8", "eval_episodes=1"]) == {
        "algo_params.reuse.epochs": 4, "algo_params.gamma": 0.99, "num_envs": 8, "eval_episodes": 1}


def test_values_read_as_yaml():
    assert bench.overrides(["segment.length=adaptive", "value.bootstrap=none"], []) == {
        "algo_params.segment.length": "adaptive", "algo_params.value.bootstrap": "none"}


@pytest.mark.parametrize("flag", ["--apg-param", "--apg-set"])
def test_a_setting_without_a_value_is_refused_in_one_line(flag, capsys):
    with pytest.raises(SystemExit):
        bench.main([flag, "num_envs"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} takes KEY=VALUE, got 'num_envs'" in err
