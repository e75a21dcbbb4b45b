"""APG's ``algo_params``: one section per component, each validating itself, and the translation of the
first, flat format (``segment_length``, ``bootstrap``, ``proximal_epochs``, ...) into the sections.

```yaml
algo_params:
  gamma: 0.99
  segment: {length: 32}                       # segments.py
  policy_gradient: {estimator: analytic}      # estimators.py
  value: {bootstrap: critic}                  # value.py
  reuse: {epochs: 0}                          # reuse.py
  proximal: {n_steps: 400, n_epochs: 20}      # proximal.py; apg-ppo only
  entropy: {alpha_init: 1.0}                  # entropy.py; sapo only (SAPOConfig)
```
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

from diffgym.training import TrainConfig
from diffgym.training.spec import from_dict

from diffgym_apg.entropy import EntropyConfig
from diffgym_apg.estimators import PolicyGradientConfig, registered_estimators
from diffgym_apg.proximal import ProximalConfig
from diffgym_apg.reuse import ReuseConfig
from diffgym_apg.segments import SegmentConfig
from diffgym_apg.value import ValueConfig


@dataclasses.dataclass
class APGConfig:
    """APG's ``algo_params`` (everything else comes from the shared :class:`TrainConfig`)."""

    gamma: float = 0.99
    """Discount factor of the return (in the actor loss, the value targets and the advantages)."""
    segment: SegmentConfig = dataclasses.field(default_factory=SegmentConfig)
    """How many steps each update backpropagates through. ``length: adaptive`` needs an estimator with
    an analytic part (it compares that part's variance with the likelihood ratio's)."""
    policy_gradient: Any = dataclasses.field(default_factory=PolicyGradientConfig)
    """The segment step (a :class:`PolicyGradientConfig`, or the ``Config`` of the estimator it names).
    Estimator ``none`` needs the ``proximal`` section (the policy learns there only)."""
    value: ValueConfig = dataclasses.field(default_factory=ValueConfig)
    """The value function. ``bootstrap: gae`` needs the ``proximal`` section (its joint steps fit it)."""
    reuse: ReuseConfig = dataclasses.field(default_factory=ReuseConfig)
    """More steps per segment on its action adjoints (RPO-style); needs ``policy_gradient.estimator:
    analytic`` without ``env_gradient_clip`` (the surrogate it descends is that step's gradient)."""
    proximal: ProximalConfig | None = None
    """The clipped likelihood-ratio epochs (trainer ``apg-ppo``). Needs a value function
    (``value.bootstrap`` other than ``none``: its advantages are GAE from that value network), and one
    (``value.critics: 1``: it reads and fits the shared actor-critic's)."""

    def __post_init__(self) -> None:
        self.policy_gradient = PolicyGradientConfig.parse(self.policy_gradient)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        estimator = registered_estimators()[self.policy_gradient.estimator]
        if self.segment.adaptive and not estimator.analytic:
            raise ValueError(f"segment.length 'adaptive' compares the analytic gradient with the likelihood ratio: "
                             f"it needs an estimator with an analytic part, not {estimator.name!r}")
        if self.reuse.enabled and (estimator.name != "analytic" or self.policy_gradient.env_gradient_clip > 0):
            raise ValueError("reuse steps descend the segment's plain analytic surrogate: they need "
                             "policy_gradient.estimator 'analytic' with env_gradient_clip 0, not "
                             f"{estimator.name!r} with {self.policy_gradient.env_gradient_clip}")
        if not estimator.steps and self.proximal is None:
            raise ValueError(f"policy_gradient.estimator {estimator.name!r} takes no segment step: it needs the "
                             "proximal section (trainer apg-ppo)")
        if self.value.bootstrap == "gae" and self.proximal is None:
            raise ValueError("value.bootstrap 'gae' is fitted in the proximal section's joint steps: it needs that "
                             "section (trainer apg-ppo)")
        if self.value.bootstrap == "gae" and self.proximal is not None and not self.proximal.vf_coef > 0:
            raise ValueError("value.bootstrap 'gae' is fitted by the proximal section's joint steps with weight "
                             f"proximal.vf_coef: it needs vf_coef > 0, got {self.proximal.vf_coef}")
        if self.proximal is not None and not self.value.enabled:
            raise ValueError("the proximal section's advantages need a value function: set value.bootstrap to "
                             "gae, mc or critic")
        if self.proximal is not None and self.proximal.gate_segment_steps and not estimator.steps:
            raise ValueError(f"proximal.gate_segment_steps gates the segment steps: estimator {estimator.name!r} takes "
                             "none")
        if self.proximal is not None and self.value.critics != 1:
            raise ValueError(f"the proximal section reads and fits one value network: it needs value.critics 1, "
                             f"not {self.value.critics}")

    @property
    def per_env_samples(self) -> bool:
        """Whether an update asks for per-env gradient samples (a variance over envs: needs >= 3 envs)."""
        return self.segment.adaptive or registered_estimators()[self.policy_gradient.estimator].per_env_samples

    @classmethod
    def from_params(cls, algo_params: Mapping[str, Any]) -> APGConfig:
        """From ``algo_params`` in either format."""
        return from_dict(cls, upgrade_params(algo_params))  # errors name the keys as --param takes them

    @classmethod
    def from_config(cls, config: TrainConfig) -> APGConfig:
        return cls.from_params(config.algo_params)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.proximal is None:
            del data["proximal"]
        return data


@dataclasses.dataclass
class SAPOConfig(APGConfig):
    """Trainer ``sapo``'s ``algo_params``: APG's sections and the ``entropy`` section (``docs/apg.md``, "SAPO")."""

    entropy: EntropyConfig = dataclasses.field(default_factory=EntropyConfig)
    """The entropy bonus and its learned temperature. Needs ``policy_gradient.estimator: analytic`` and
    ``reuse.epochs: 0`` (both read the action adjoints only, which do not carry the log-std term)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy_gradient.estimator != "analytic":
            raise ValueError(f"the entropy section's bonus is differentiated through the actions and the log-std: it "
                             f"needs policy_gradient.estimator 'analytic', not {self.policy_gradient.estimator!r}")
        if self.reuse.enabled:
            raise ValueError("the entropy section's log-std term is not in the action adjoints reuse steps descend: "
                             "it needs reuse.epochs 0")


# --------------------------------------------------------------------------- the first, flat format
LEGACY_KEYS = {  # flat key -> (section, field)
    "segment_length": ("segment", "length"), "min_segment_length": ("segment", "min_length"),
    "max_segment_length": ("segment", "max_length"), "noise_high": ("segment", "noise_high"),
    "noise_low": ("segment", "noise_low"),
    "estimator": ("policy_gradient", "estimator"), "segment_lr": ("policy_gradient", "lr"),
    "env_gradient_clip": ("policy_gradient", "env_gradient_clip"),
    "bootstrap": ("value", "bootstrap"), "critic_lr": ("value", "lr"), "critic_epochs": ("value", "epochs"),
    "critic_minibatches": ("value", "minibatches"), "td_lambda": ("value", "td_lambda"),
    "target_tau": ("value", "target_tau"), "value_scaling": ("value", "normalize_reward"),
    "proximal_epochs": ("proximal", "n_epochs"), "proximal_horizon": ("proximal", "n_steps"),
    "proximal_minibatch_size": ("proximal", "batch_size"), "clip_range": ("proximal", "clip_range"),
    "gae_lambda": ("proximal", "gae_lambda"), "entropy_coef": ("proximal", "ent_coef"),
    "proximal_value_coef": ("proximal", "vf_coef"), "proximal_lr": ("proximal", "learning_rate"),
}
"""Every key of the flat format but ``gamma`` (unchanged) and ``proximal_value_fit`` (now
``value.bootstrap: gae``). The short ones stay the trainer's CLI flags (``--segment-length``,
``--bootstrap``, ``--estimator``)."""
LEGACY_VALUES = {("policy_gradient", "estimator"): {"proximal": "none"}, ("value", "bootstrap"): {"value": "gae"}}


FIELDS_ADDED = {("proximal", "gate_segment_steps"): False}
"""Section fields added after the sectioned format, with the value that keeps a run saved before them as it
ran; ``reuse`` is a whole section added after it (absent: no reuse steps). The ``policy_gradient`` section
needs no entry: :func:`complete_policy_gradient` gives it every field of its estimator (``lr_decay``,
added later, at its default 1: constant)."""


def fill_added_fields(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the fields a config saved before they existed lacks (:data:`FIELDS_ADDED`, the
    ``reuse`` section), so such a run resumes with its own command: the run directory compares the saved
    config with the one asked for key by key."""
    for (section, field), value in FIELDS_ADDED.items():
        if isinstance(params.get(section), dict):
            params[section].setdefault(field, value)
    params.setdefault("reuse", dataclasses.asdict(ReuseConfig()))
    return complete_policy_gradient(params)


def complete_policy_gradient(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the ``policy_gradient`` section holding every field of its estimator's ``Config``
    (a plugin's own options, at their defaults where not given), so ``--print-config`` shows them and
    ``config.yaml`` records them: a plugin whose default changes does not resume a run unnoticed. An
    unknown or broken estimator is left for :meth:`PolicyGradientConfig.parse` to name."""
    section = params.get("policy_gradient")
    if not isinstance(section, dict):
        return params
    name = section.get("estimator", PolicyGradientConfig.estimator)
    estimator = registered_estimators().get(name) if isinstance(name, str) else None
    if estimator is not None:
        defaults = dataclasses.asdict(estimator.Config(estimator=estimator.name))
        params["policy_gradient"] = {**defaults, **section}
    return params


def is_legacy(params: Mapping[str, Any]) -> bool:
    return "proximal_value_fit" in params or any(key in params and not isinstance(params[key], Mapping)
                                                 for key in LEGACY_KEYS)


def upgrade_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``algo_params`` in the sectioned format: flat keys (a whole config of the first format, or single
    keys set on top of sections, e.g. ``--param segment_length=16``) moved into their sections, where
    they override what the section said; sectioned input passes through unchanged."""
    params = copy.deepcopy(dict(params))
    if not is_legacy(params):
        return fill_added_fields(params)
    value_fit = params.pop("proximal_value_fit", None)
    flat = {key: params.pop(key) for key in list(params)
            if key in LEGACY_KEYS and not isinstance(params[key], Mapping)}
    stray = sorted(key for key in flat if LEGACY_KEYS[key][0] == "proximal")
    if stray and params.get("proximal") is None and "proximal_epochs" not in flat:
        # (a whole config of the first format has proximal_epochs, 0 where the path was off)
        raise ValueError(f"{', '.join(stray)} set the proximal path (section proximal, trainer apg-ppo), which this "
                         "config does not have" + (" (the reuse steps' clip is reuse.clip_range)"
                                                   if "clip_range" in stray else ""))
    for key, value in flat.items():
        section, field = LEGACY_KEYS[key]
        value = LEGACY_VALUES.get((section, field), {}).get(value, value)
        if section == "proximal" and params.get("proximal") is None:
            params["proximal"] = {}
        params.setdefault(section, {})[field] = value
    proximal = params.get("proximal")
    if proximal is not None and proximal.get("n_epochs", ProximalConfig.n_epochs) == 0:
        params["proximal"] = None  # the first format's "proximal_epochs: 0": the path is off
    if value_fit and params.get("proximal") is not None:
        value = params.setdefault("value", {})
        bootstrap = value.get("bootstrap", ValueConfig.bootstrap)
        no_step = params.get("policy_gradient", {}).get("estimator") == "none"
        if bootstrap == "none" and no_step:
            value["bootstrap"] = "gae"  # without segment steps no tail is ever read: the joint fit is all there is
        elif bootstrap in ("mc", "critic"):
            raise ValueError(f"proximal_value_fit with bootstrap {bootstrap!r} fitted the value network twice, by two "
                             "Adams towards two targets (docs/apg.md: it stalls TPush); that is no longer offered: use "
                             "value.bootstrap gae (the joint steps alone) or mc/critic (their own steps alone)")
        elif bootstrap == "none":
            raise ValueError("proximal_value_fit with bootstrap 'none' (segments closed by no tail, a value network "
                             "fitted by the joint steps for the advantages) is no longer offered: use value.bootstrap "
                             "gae (that network closes the segments too)")
    elif value_fit is False and params.get("value", {}).get("bootstrap") == "gae":
        raise ValueError("proximal_value_fit false leaves value.bootstrap 'gae' unfitted (the joint steps are its only "
                         "fit): set value.bootstrap mc or critic for a value network fitted by its own steps")
    if "proximal" in params and params["proximal"] is None:
        del params["proximal"]
    return fill_added_fields(params)


def upgrade_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A whole ``TrainConfig`` mapping of the ``apg`` trainer, as written by any version, in today's
    format: ``algo_params`` in sections, and a run with the proximal path named ``apg-ppo`` (the first
    format called every run ``apg``)."""
    data = dict(data)
    legacy = is_legacy(data.get("algo_params") or {})
    data["algo_params"] = upgrade_params(data.get("algo_params") or {})
    if legacy and data.get("algo") == "apg" and data["algo_params"].get("proximal") is not None:
        data["algo"] = "apg-ppo"
    return data
