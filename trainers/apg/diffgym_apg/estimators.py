"""Policy-gradient estimators of a segment's objective (``algo_params.policy_gradient``).

An estimator turns a :class:`~diffgym_apg.objective.SegmentObjective` into the actor's ``.grad``: the
segment step APG takes after every unroll. Built in:

* ``analytic``: exact, through ``differentiable_step`` (first order, reparameterized actions);
* ``likelihood``: REINFORCE with a baseline on the same segment (zeroth order, no simulator gradient);
* ``hybrid``: Suh et al.'s alpha-order combination of the two, alpha chosen per update;
* ``none``: no segment step (a variant whose policy learns elsewhere, e.g. ``apg-ppo``'s clipped epochs).

A new estimator is a subclass of :class:`Estimator` registered with :func:`register_estimator`; its
options are fields of a :class:`PolicyGradientConfig` subclass named as its ``Config`` (``docs/apg.md``,
"Adding an estimator").
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from torch import nn

from diffgym.training.gradients import hybrid_weight, surrogate_for_adjoints
from diffgym.training.spec import from_dict

from diffgym_apg.objective import SegmentObjective

ENTRY_POINT_GROUP = "diffgym_apg.estimators"
"""Installed packages declare their estimators here (``name = module:Class``), for the command line."""
ESTIMATORS: dict[str, type[Estimator]] = {}
"""Estimators registered in this process, by name (``policy_gradient.estimator``); see :func:`registered_estimators`."""
FAILED_ESTIMATORS: dict[str, str] = {}
"""Installed estimators whose entry point failed to load, by name: the one-line reason. They are left out of
:data:`ESTIMATORS`, so one broken package stops only the runs that choose its estimator."""
_installed_loaded = False


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make ``cls`` selectable as ``policy_gradient.estimator: <cls.name>``."""
    ESTIMATORS[cls.name] = cls
    return cls


def registered_estimators() -> dict[str, type[Estimator]]:
    """Every estimator by name: the registered ones and, loaded on first use, the installed ones that load
    (the others are in :data:`FAILED_ESTIMATORS`)."""
    global _installed_loaded
    if not _installed_loaded:
        _installed_loaded = True
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in ESTIMATORS:
                continue
            try:
                ESTIMATORS[entry_point.name] = entry_point.load()
            except Exception as error:  # anything a third party's import can raise: reported when chosen
                reason = " ".join(str(error).split()) or type(error).__name__
                FAILED_ESTIMATORS[entry_point.name] = (f"{type(error).__name__}: {reason} "
                                                       f"(entry point {entry_point.value})")
    return ESTIMATORS


def estimator_class(name: str) -> type[Estimator]:
    """The estimator ``policy_gradient.estimator`` names; a one-line ``ValueError`` for an unknown name or
    one whose package failed to load."""
    known = registered_estimators()
    if name in known:
        return known[name]
    if name in FAILED_ESTIMATORS:
        raise ValueError(f"policy_gradient.estimator {name!r} failed to load: {FAILED_ESTIMATORS[name]}")
    raise ValueError(f"policy_gradient.estimator must be one of {sorted(known)}, got {name!r}")


@dataclasses.dataclass
class PolicyGradientConfig:
    """``algo_params.policy_gradient``: the segment step."""

    estimator: str = "analytic"
    """How the segment's policy gradient is estimated (a name in :data:`ESTIMATORS`)."""
    lr: float | None = None
    """Adam learning rate of the segment step; None: the shared ``optimizer.lr``. Beside a likelihood-ratio
    path the analytic steps need a far smaller rate than its clipped epochs (``docs/apg.md``, TPush)."""
    lr_decay: float = 1.0
    """Factor on that learning rate after every update (Brax's APG: 0.997), so the schedule is per update, not
    per env step (it depends on K); the reuse steps, which share its Adam, follow it. 1: constant. A rate that shrinks keeps a policy that has reached its goal
    from drifting away again under the short segments' noisy steps."""
    env_gradient_clip: float = 0.0
    """A robust mean of the analytic gradient: each env's share of it (its row of the per-env
    decomposition) is scaled down to at most this multiple of the batch's median per-env norm before the
    mean; 0 (off) takes the plain mean. Through sustained contact the per-env gradients are heavy-tailed
    (``docs/apg.md``), and one env can set the direction of a whole batch. Estimators with an analytic
    part only."""

    def __post_init__(self) -> None:
        estimator = estimator_class(self.estimator)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"policy_gradient.lr must be > 0 (or None: the shared optimizer.lr), got {self.lr}")
        if not 0.0 < self.lr_decay <= 1.0:  # NaN fails too
            raise ValueError(f"policy_gradient.lr_decay must be in (0, 1] (1: constant), got {self.lr_decay}")
        if not self.env_gradient_clip >= 0:  # NaN fails too
            raise ValueError(f"policy_gradient.env_gradient_clip must be >= 0 (0: off), got {self.env_gradient_clip}")
        # (estimator none takes no step, so nothing here applies: a grid over estimators may keep the rest)
        if self.env_gradient_clip > 0 and estimator.steps and not estimator.analytic:
            raise ValueError(f"policy_gradient.env_gradient_clip ({self.env_gradient_clip}) clips the per-env analytic "
                             f"gradients: set it to 0 with estimator {self.estimator!r}")

    @staticmethod
    def parse(section: Any) -> PolicyGradientConfig:
        """The section as its estimator's ``Config`` reads it."""
        if isinstance(section, PolicyGradientConfig):
            section = dataclasses.asdict(section)
        if not isinstance(section, dict):
            raise ValueError(f"policy_gradient must be a mapping, got {section!r}")
        estimator = estimator_class(section.get("estimator", PolicyGradientConfig.estimator))
        return from_dict(estimator.Config, section, "policy_gradient.")


class Estimator:
    """Writes a segment's policy gradient into the actor parameters' ``.grad``."""

    name: ClassVar[str]
    analytic: ClassVar[bool]
    """Whether it reads the simulator's gradient (the unroll then records the graph)."""
    steps: ClassVar[bool] = True
    """Whether there is a segment step at all."""
    per_env_samples: ClassVar[bool] = False
    """Whether it reads per-env gradient samples (a spread over envs: the run needs ``num_envs >= 3``)."""
    Config: ClassVar[type[PolicyGradientConfig]] = PolicyGradientConfig

    def __init__(self, config: PolicyGradientConfig):
        self.config = config

    def estimate(self, objective: SegmentObjective, parameters: list[nn.Parameter]) -> dict[str, float]:
        """Set ``p.grad`` for ``parameters`` (the actor's, in ``actor_parameters`` order) to the gradient
        of ``objective.loss`` (the mean over the kept envs); return statistics to log."""
        raise NotImplementedError

    def analytic_samples(self, objective: SegmentObjective, stats: dict[str, float]) -> torch.Tensor:
        """The per-env analytic samples, clipped as ``env_gradient_clip`` says."""
        samples = objective.per_env_analytic
        if self.config.env_gradient_clip > 0:
            samples, stats["env_gradients_clipped"] = clip_env_gradients(samples, self.config.env_gradient_clip)
        return samples


@register_estimator
class Analytic(Estimator):
    """``sum_t (da_t/dtheta)^T dL/da_t``: exact, through the simulator."""

    name, analytic = "analytic", True

    def estimate(self, objective: SegmentObjective, parameters: list[nn.Parameter]) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.config.env_gradient_clip > 0 or objective.sampled("per_env_analytic"):
            set_gradient(parameters, self.analytic_samples(objective, stats).mean(dim=0))
            return stats
        # one pass through the policy instead of per-env samples
        segment = objective.segment
        surrogate = surrogate_for_adjoints(objective.model, segment.obs_normalized, segment.noise,
                                           objective.action_adjoints)
        (surrogate * (objective.num_envs / objective.kept)).backward(inputs=parameters)
        return stats


@register_estimator
class Likelihood(Estimator):
    """``sum_{t,i} w_{t,i} grad log pi(u | o)``: the likelihood ratio of the same segment."""

    name, analytic = "likelihood", False

    def estimate(self, objective: SegmentObjective, parameters: list[nn.Parameter]) -> dict[str, float]:
        if objective.sampled("per_env_likelihood"):
            set_gradient(parameters, objective.per_env_likelihood.mean(dim=0))
            return {}
        segment = objective.segment
        surrogate = (objective.model.log_prob(segment.obs_normalized, segment.pre_squash)
                     * objective.likelihood_weights).sum()
        (surrogate * (objective.num_envs / objective.kept)).backward(inputs=parameters)
        return {}


@register_estimator
class Hybrid(Estimator):
    """``alpha * analytic + (1 - alpha) * likelihood``, alpha from both estimates' per-env samples
    (:func:`diffgym.training.gradients.hybrid_weight`)."""

    name, analytic, per_env_samples = "hybrid", True, True

    def estimate(self, objective: SegmentObjective, parameters: list[nn.Parameter]) -> dict[str, float]:
        stats: dict[str, float] = {}
        likelihood = objective.per_env_likelihood
        analytic = self.analytic_samples(objective, stats)
        alpha, parts = hybrid_weight(analytic, likelihood)
        stats.update(hybrid_alpha=alpha, **parts)
        set_gradient(parameters, alpha * analytic.mean(dim=0) + (1.0 - alpha) * likelihood.mean(dim=0))
        return stats


@register_estimator
class NoStep(Estimator):
    """No segment step: the policy learns from another path only (``apg-ppo``'s clipped epochs)."""

    name, analytic, steps = "none", False, False


def clip_env_gradients(per_env: torch.Tensor, multiple: float) -> tuple[torch.Tensor, float]:
    """Rows of ``per_env`` (N, P) scaled down to at most ``multiple`` times the median norm of the rows
    that carry any gradient (zero rows, e.g. envs that never touched anything, neither set the bound nor
    change); returns them and the fraction of rows that were scaled. A row whose norm overflows the
    dtype is scaled to zero."""
    norms = per_env.norm(dim=1)
    carrying = norms[norms > 0]
    if carrying.numel() == 0:
        return per_env, 0.0
    bound = multiple * carrying.median()
    over = norms > bound
    scale = torch.where(over, bound / norms, torch.ones_like(norms))
    return per_env * scale[:, None], float(over.float().mean())


def set_gradient(parameters: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Write a flat gradient (in ``parameters`` order) into their ``.grad``."""
    offset = 0
    for p in parameters:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
