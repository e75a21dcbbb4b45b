"""An estimator plugin's own options from the command line, and a broken estimator package
(``docs/apg.md``, "Adding an estimator")."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from diffgym.cli import main as diffgym_main
from diffgym.plugins import resolve_config
from diffgym_apg import Estimator, PolicyGradientConfig
from diffgym_apg import estimators as estimators_module
from diffgym_apg.config import APGConfig

POINT_MASS = "DiffGym/PointMass1D-v0"


@dataclasses.dataclass
class WeightedConfig(PolicyGradientConfig):
    analytic_weight: float = 0.5


class Weighted(Estimator):
    name, analytic, Config = "test-weighted", True, WeightedConfig


@pytest.fixture
def weighted_estimator(monkeypatch):
    """``Weighted`` registered for the test only (a copy of the registry is patched in)."""
    monkeypatch.setattr(estimators_module, "ESTIMATORS", dict(estimators_module.ESTIMATORS))
    estimators_module.register_estimator(Weighted)


@pytest.mark.parametrize("overrides", [
    {"algo_params.estimator": "test-weighted", "algo_params.policy_gradient.analytic_weight": 0.8},
    # the option before the estimator that takes it
    {"algo_params.policy_gradient.analytic_weight": 0.8, "algo_params.policy_gradient.estimator": "test-weighted"},
])
def test_an_estimators_own_option_is_set_by_dotted_key(weighted_estimator, overrides):
    config = resolve_config("apg", POINT_MASS, overrides)
    assert config.algo_params["policy_gradient"]["analytic_weight"] == 0.8
    assert APGConfig.from_config(config).policy_gradient.analytic_weight == 0.8
    with pytest.raises(ValueError, match=r"^unknown config key 'policy_gradient.analytic_weight'; the keys "
                                         r"policy_gradient holds: estimator, lr, lr_decay, env_gradient_clip$"):
        resolve_config("apg", POINT_MASS, {"algo_params.policy_gradient.analytic_weight": 0.8})  # analytic's
    with pytest.raises(ValueError, match=r"^unknown config key 'segment.lenght'; the keys segment holds: length"):
        resolve_config("apg", POINT_MASS, {"algo_params.segment.lenght": 8})


def test_print_config_shows_the_chosen_estimators_options_at_their_defaults(weighted_estimator, capsys):
    """So config.yaml records them too, and a plugin whose default changes does not resume a run unnoticed."""
    assert diffgym_main(["train", "--algo", "apg", "--env", POINT_MASS, "--estimator", "test-weighted",
                         "--print-config"]) == 0
    section = yaml.safe_load(capsys.readouterr().out)["algo_params"]["policy_gradient"]
    assert section == {"estimator": "test-weighted", "lr": None, "lr_decay": 1.0, "env_gradient_clip": 0.0,
                       "analytic_weight": 0.5}


class BrokenEntryPoint:
    name, value = "broken-estimator", "broken_package:Estimator"

    def load(self):
        raise ImportError("No module named 'broken_package'")


def test_a_broken_estimator_package_stops_only_the_runs_that_choose_it(monkeypatch):
    monkeypatch.setattr(estimators_module, "ESTIMATORS", dict(estimators_module.ESTIMATORS))
    monkeypatch.setattr(estimators_module, "FAILED_ESTIMATORS", {})
    monkeypatch.setattr(estimators_module, "_installed_loaded", False)
    monkeypatch.setattr(estimators_module, "entry_points", lambda group: [BrokenEntryPoint()])
    assert APGConfig.from_params({"policy_gradient": {"estimator": "analytic"}}).policy_gradient.estimator == "analytic"
    with pytest.raises(ValueError, match=r"^policy_gradient.estimator 'broken-estimator' failed to load: ImportError: "
                                         r"No module named 'broken_package' \(entry point broken_package:Estimator\)$"):
        APGConfig.from_params({"policy_gradient": {"estimator": "broken-estimator"}})
    with pytest.raises(ValueError, match=r"must be one of \['analytic', 'hybrid', 'likelihood', 'none'\], got 'nope'"):
        APGConfig.from_params({"policy_gradient": {"estimator": "nope"}})
