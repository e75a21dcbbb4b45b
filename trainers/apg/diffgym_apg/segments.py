"""The segment schedule: how many steps K each APG update backpropagates through (``segment`` section).

A fixed K, or ``adaptive``: K chosen by comparing the analytic gradient's variance with the likelihood
ratio's (:class:`AdaptiveSegmentLength`, ``docs/apg.md``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from diffgym.training.gradients import sample_statistics


@dataclasses.dataclass
class SegmentConfig:
    """``algo_params.segment``."""

    length: int | str = 32
    """K, steps backpropagated through per update; the episode length means full backpropagation.
    ``adaptive``: chosen every update between ``min_length`` and ``max_length`` from the analytic
    gradient's variance relative to the likelihood ratio's (needs an estimator with an analytic part)."""
    min_length: int = 8
    """Lower bound of the adaptive length (and where it starts)."""
    max_length: int = 64
    """Upper bound of the adaptive length."""
    noise_high: float = 1.0
    """Adaptive K halves when the analytic gradient's variance exceeds this times the likelihood
    ratio's (per-sample variance traces over the envs) ..."""
    noise_low: float = 0.1
    """... and doubles when it stays below this times it."""

    def __post_init__(self) -> None:
        if isinstance(self.length, str) and self.length != "adaptive":
            raise ValueError(f"segment.length must be a positive integer or 'adaptive', got {self.length!r}")
        if not self.adaptive and self.length < 1:
            raise ValueError(f"segment.length must be a positive integer or 'adaptive', got {self.length!r}")
        if self.adaptive and not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= segment.min_length <= segment.max_length, got "
                             f"{self.min_length} and {self.max_length}")
        if not 0.0 < self.noise_low < self.noise_high:
            raise ValueError(f"need 0 < segment.noise_low < segment.noise_high, got {self.noise_low} and "
                             f"{self.noise_high}")

    @property
    def adaptive(self) -> bool:
        return self.length == "adaptive"

    def schedule(self) -> FixedSegmentLength | AdaptiveSegmentLength:
        return AdaptiveSegmentLength(self) if self.adaptive else FixedSegmentLength(int(self.length))


class FixedSegmentLength:
    """The same K every update."""

    needs_samples = False
    """Whether :meth:`observe` wants per-env gradient samples of both estimators."""

    def __init__(self, length: int):
        self.length = length

    def observe(self, analytic: torch.Tensor, likelihood: torch.Tensor) -> float:
        return math.nan

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, saved: Any) -> None:
        pass


class AdaptiveSegmentLength:
    """Segment length K chosen by comparing the analytic gradient's variance with the likelihood ratio's.

    Long segments give an exact gradient of a long-horizon objective, until the dynamics make it
    explode: through stiff contacts or chaotic stretches the per-env gradients grow exponentially with
    the horizon (Metz et al. 2021, "Gradients are not all you need"; AHAC, Georgiev et al. 2024, cuts
    horizons at stiff contacts for this reason). The analytic estimate is worth backpropagating only
    while it is less noisy than the likelihood-ratio estimate of the same rollouts, which needs no
    simulator gradient and whose variance grows only with the return's scale (Suh et al. 2022; see
    ``diffgym grad-stats``, where the two variance curves cross on the contact tasks). Every update
    measures ``rho = tr Cov(g_analytic) / tr Cov(g_likelihood)`` over the envs: ``rho > noise_high``
    halves K, ``rho < noise_low`` doubles it, within ``[min_length, max_length]``. Both variances are
    exponential moving averages (weight ``smoothing``), K changes at most every ``patience`` updates,
    and the averages restart after a change (they belong to the previous K). K starts at the lower bound.
    """

    needs_samples = True

    def __init__(self, config: SegmentConfig, smoothing: float = 0.7, patience: int = 4):
        self.minimum, self.maximum = config.min_length, config.max_length
        self.high, self.low = config.noise_high, config.noise_low
        self.smoothing, self.patience = smoothing, patience
        self.length = self.minimum
        self.analytic_variance = self.likelihood_variance = None
        self.updates = 0

    def observe(self, analytic: torch.Tensor, likelihood: torch.Tensor) -> float:
        """Fold one update's per-env gradients ``(N, P)`` of both estimators into the averages; maybe
        change K. Returns the smoothed variance ratio ``rho``."""
        if analytic.shape[0] < 2:
            return math.nan  # no spread to measure (too few envs kept this update): nothing learned
        a = sample_statistics(analytic).variance_trace
        z = sample_statistics(likelihood).variance_trace
        if not math.isfinite(a):
            a = math.inf  # exploding analytic gradients: the ratio below is inf and K halves
        if not math.isfinite(z) or (math.isinf(a) and self.analytic_variance is not None and
                                    math.isinf(self.analytic_variance)):
            return math.nan  # nothing comparable this update
        if self.analytic_variance is None:
            self.analytic_variance, self.likelihood_variance = a, z
        else:
            w = self.smoothing
            self.analytic_variance = w * self.analytic_variance + (1 - w) * a
            self.likelihood_variance = w * self.likelihood_variance + (1 - w) * z
        self.updates += 1
        ratio = self.analytic_variance / self.likelihood_variance if self.likelihood_variance > 0 else math.inf
        if self.updates >= self.patience:
            changed = self.length
            if ratio > self.high:
                changed = max(self.minimum, self.length // 2)
            elif ratio < self.low:
                changed = min(self.maximum, self.length * 2)
            if changed != self.length:
                self.length, self.analytic_variance, self.likelihood_variance, self.updates = changed, None, None, 0
        return ratio

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "analytic_variance": self.analytic_variance,
                "likelihood_variance": self.likelihood_variance, "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved:  # None: a checkpoint of a fixed length
            self.length, self.updates = saved["length"], saved["updates"]
            self.analytic_variance, self.likelihood_variance = saved["analytic_variance"], saved["likelihood_variance"]
