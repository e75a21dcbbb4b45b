"""Policy-gradient estimators of one rollout, per env: the analytic path and the likelihood-ratio path.

Both estimate the gradient of the same objective, a batch's (discounted) return, with respect to the
policy's *actor* parameters (the actor MLP and the log-std, in ``actor_parameters`` order):

* **analytic** (first order, reparameterized): ``a = squash(mu_theta(o) + sigma_theta * eps)`` is a
  differentiable function of the parameters, and the return's total derivative with respect to each
  action, ``lambda_t = dJ/da_t`` (through the simulator, the later observations and the later actions),
  comes from one backward pass. Since the parameters enter the return only through the actions, the
  gradient is ``sum_t (da_t/dtheta |_{o_t})^T lambda_t``: a cheap pass through the policy alone, done per
  env with ``torch.func.vmap``.
* **likelihood ratio** (zeroth order, REINFORCE with a baseline): ``sum_t A_t grad log pi(u_t | o_t)`` with
  ``u`` the pre-squash sample and ``A_t`` the return from ``t`` minus a baseline; no simulator gradient.

Per-env samples ``g_i`` (shape ``(N, P)``) are scaled so that their mean is the batch estimate. From
them: :func:`sample_statistics` (mean, norm, variance trace), :func:`compare_estimators` (cosine, the
empirical bias signal of Suh et al. 2022) and :func:`hybrid_weight` (their alpha-order combination).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from diffgym.training.networks import ActorCritic


def actor_parameters(model: ActorCritic) -> list[nn.Parameter]:
    """The parameters the policy gradient moves: the actor MLP's, then the log-std."""
    return [*model.actor.parameters(), model.log_std]


def _split(model: ActorCritic, flat_params: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    names = [name for name, _ in model.actor.named_parameters()]
    return dict(zip(names, flat_params[:-1])), flat_params[-1]


def _flatten(grads: tuple[torch.Tensor, ...], num_envs: int) -> torch.Tensor:
    return torch.cat([g.reshape(num_envs, -1) for g in grads], dim=1)


def _per_env(model: ActorCritic, summand, *time_major: torch.Tensor) -> torch.Tensor:
    """``(N, P)``: for each env ``i`` the gradient with respect to the actor's parameters of
    ``summand(actor_params, log_std, *(x[:, i] for x in time_major))``, vectorized over envs."""
    params = tuple(p.detach() for p in actor_parameters(model))

    def env_value(flat, *env_tensors):
        actor_params, log_std = _split(model, flat)
        return summand(actor_params, log_std, *env_tensors)

    grads = torch.func.vmap(torch.func.grad(env_value), in_dims=(None, *([1] * len(time_major))))(
        params, *(x.detach() for x in time_major))
    return _flatten(grads, time_major[0].shape[1])


def per_env_analytic_gradients(model: ActorCritic, obs_normalized: torch.Tensor, noise: torch.Tensor,
                               action_adjoints: torch.Tensor) -> torch.Tensor:
    """``(N, P)``: env i's ``sum_t (da_t/dtheta)^T lambda_t`` (observations held fixed).

    ``obs_normalized`` (K, N, D), ``noise`` (K, N, A) the ``eps`` each action was drawn with, and
    ``action_adjoints`` (K, N, A) the total derivatives of the objective with respect to the actions.
    Rows must be finite (mask diverged envs before calling).
    """
    def env_dot(actor_params, log_std, obs, eps, adjoint):
        mean = torch.func.functional_call(model.actor, actor_params, (obs,))
        return (model.squash(mean + log_std.exp() * eps) * adjoint).sum()

    return _per_env(model, env_dot, obs_normalized, noise, action_adjoints)


def per_env_likelihood_gradients(model: ActorCritic, obs_normalized: torch.Tensor, pre_squash: torch.Tensor,
                                 weights: torch.Tensor) -> torch.Tensor:
    """``(N, P)``: env i's ``sum_t weights[t, i] * grad log N(u_t; mu_theta(o_t), sigma_theta)``.

    ``weights`` (K, N) are the (already scaled, signed) advantages; ``pre_squash`` (K, N, A) the
    Gaussian samples ``u`` (the squash does not depend on the parameters, so its Jacobian drops out).
    """
    def env_score(actor_params, log_std, obs, u, w):
        mean = torch.func.functional_call(model.actor, actor_params, (obs,))
        log_prob = (-0.5 * ((u - mean) / log_std.exp()).square() - log_std).sum(-1)  # + const
        return (log_prob * w).sum()

    return _per_env(model, env_score, obs_normalized, pre_squash, weights)


def surrogate_for_adjoints(model: ActorCritic, obs_normalized: torch.Tensor, noise: torch.Tensor,
                           action_adjoints: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """A scalar whose parameter gradient is ``sum_{t,i} (da_{t,i}/dtheta)^T lambda_{t,i}``: the batch's
    analytic gradient without per-env samples (one policy forward and backward). ``mean``: the actor's
    output for these observations where the caller has it already (with its graph)."""
    mean = model.actor(obs_normalized.detach()) if mean is None else mean
    actions = model.squash(mean + model.log_std.exp() * noise.detach())
    return (actions * action_adjoints.detach()).sum()


def leave_one_out_baseline(values: torch.Tensor) -> torch.Tensor:
    """``(K, N)``: for each env the mean of the *other* envs' values at the same step (independent of
    the env's own action, so subtracting it keeps the likelihood-ratio estimate unbiased)."""
    num_envs = values.shape[1]
    if num_envs < 2:
        return torch.zeros_like(values)
    return (values.sum(dim=1, keepdim=True) - values) / (num_envs - 1)


# ------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass
class SampleStatistics:
    """Of per-env gradient samples ``(N, P)``: the batch estimate and its spread."""

    mean: torch.Tensor
    """(P,) the batch estimate (mean of the samples)."""
    norm: float
    """Its L2 norm."""
    variance_trace: float
    """Per-sample variance, summed over parameters: ``tr Cov(g_i)`` (unbiased, N - 1)."""
    num_samples: int

    @property
    def standard_error(self) -> float:
        """``sqrt(tr Cov / N)``: the expected distance of the batch estimate from its expectation."""
        return math.sqrt(self.variance_trace / max(self.num_samples, 1))

    @property
    def noise_to_signal(self) -> float:
        """``(tr Cov / N) / ||E g||^2`` with the unbiased ``||E g||^2 = ||mean||^2 - tr Cov / N``: the
        squared relative error of the batch estimate (McCandlish et al. 2018's gradient noise scale over
        the batch size). Above 1 the noise is larger than the signal; ``inf`` when no signal is left."""
        noise = self.variance_trace / max(self.num_samples, 1)
        signal = self.norm ** 2 - noise
        return noise / signal if signal > 0 else math.inf


def sample_statistics(samples: torch.Tensor) -> SampleStatistics:
    samples = samples.double()
    n = samples.shape[0]
    mean = samples.mean(dim=0)
    variance = float(column_variance(samples).sum()) if n > 1 else math.inf
    return SampleStatistics(mean, float(mean.norm()), variance, n)


def column_variance(samples: torch.Tensor) -> torch.Tensor:
    """``samples.var(dim=0, unbiased=True)`` of ``(N, P)`` float64 samples (N >= 2), the same bits, at a
    fraction of its cost on the CPU. There torch reduces each of several columns with Welford's recurrence,
    one column after another (for the per-env gradients, N = 4 by P ~ 4.6k: ~0.45 ms on one thread, where
    the gradients themselves cost ~1 ms); here the same recurrence, in the same float64 operations, runs
    over all columns at once: N steps of five vector ops (~0.07 ms). A single column (which torch reduces
    along another path, with other bits) and other devices (whose kernels combine partial sums in other
    orders) get torch's own ``var``; ``tests/test_apg_fast_paths.py`` compares the two."""
    if samples.device.type != "cpu" or samples.shape[1] < 2:
        return samples.var(dim=0, unbiased=True)
    mean = m2 = torch.zeros_like(samples[0])
    for count, row in enumerate(samples, start=1):
        delta = row - mean
        mean = mean + delta / count
        m2 = m2 + delta * (row - mean)
    return m2 / (samples.shape[0] - 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a.double() @ b.double()) / denominator if denominator > 0 else math.nan


@dataclasses.dataclass
class EstimatorComparison:
    """Analytic (first-order) against likelihood-ratio (zeroth-order) samples of the same rollouts.

    The likelihood-ratio estimate is unbiased whatever the dynamics; the analytic one is unbiased only
    where the return is differentiable and its gradient is well behaved (Suh et al. 2022, "Do
    differentiable simulators give better policy gradients?"). Their paired differences
    ``d_i = g1_i - g0_i`` estimate the analytic estimator's bias; ``bias_sq`` is the unbiased
    U-statistic ``||d_bar||^2 - tr Cov(d) / N`` of ``||E d||^2`` and ``bias_sq_se`` its jackknife standard
    error, so ``biased`` says the two disagree beyond their confidence intervals (``bias_sq > 2 se``).
    """

    cosine: float
    difference_norm: float
    """``||mean(g1) - mean(g0)||``."""
    difference_standard_error: float
    """``sqrt(tr Cov(d) / N)``: what ``difference_norm`` is expected to be when there is no bias."""
    bias_sq: float
    bias_sq_se: float

    @property
    def bias_z(self) -> float:
        return self.bias_sq / self.bias_sq_se if self.bias_sq_se > 0 else math.nan

    @property
    def biased(self) -> bool:
        return bool(self.bias_sq > 2.0 * self.bias_sq_se)


def compare_estimators(analytic: torch.Tensor, likelihood: torch.Tensor) -> EstimatorComparison:
    d = (analytic.double() - likelihood.double())
    n = d.shape[0]
    gram = d @ d.T
    off_diagonal = gram.sum() - gram.diagonal().sum()
    bias_sq = float(off_diagonal) / (n * (n - 1)) if n > 1 else math.nan
    # jackknife over envs: drop env i from the pairwise sum
    if n > 2:
        without = (off_diagonal - 2.0 * (gram.sum(dim=1) - gram.diagonal())) / ((n - 1) * (n - 2))
        se = float(math.sqrt((n - 1) / n * float((without - without.mean()).square().sum())))
    else:
        se = math.nan
    d_bar = d.mean(dim=0)
    diff_se = math.sqrt(float(d.var(dim=0, unbiased=True).sum()) / n) if n > 1 else math.nan
    return EstimatorComparison(cosine(analytic.mean(dim=0), likelihood.mean(dim=0)), float(d_bar.norm()),
                               diff_se, bias_sq, se)


def hybrid_weight(analytic: torch.Tensor, likelihood: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The alpha-order weight of Suh et al. 2022: ``alpha * mean(g1) + (1 - alpha) * mean(g0)``, with
    alpha chosen to minimize the combination's estimated mean squared error.

    With ``g0`` (likelihood ratio) unbiased and ``g1`` (analytic) biased by ``b``, on the same rollouts:
    ``MSE(alpha) = alpha^2 (||b||^2 + v1) + (1 - alpha)^2 v0 + 2 alpha (1 - alpha) c``, where ``v1, v0`` are
    the variances (traces) of the two batch means and ``c`` their covariance. Its minimum is at
    ``alpha = (v0 - c) / (||b||^2 + v_d)``, ``v_d = v1 + v0 - 2c`` the variance of the paired difference's
    mean; ``||b||^2`` is the lower 2-sigma confidence bound of the unbiased U-statistic of
    :func:`compare_estimators` (clipped at 0), so a bias counts only where the two estimates disagree
    beyond their noise (with few samples the U-statistic alone fluctuates enough to cut alpha). Where
    the two agree within their noise (``||b||^2 ~ 0``) and the analytic samples are precise, alpha is
    close to 1; where they disagree (non-smooth or exploding dynamics) or the analytic variance
    explodes, alpha falls towards the likelihood path. Suh et al. minimize the variance under a bias
    bound ``gamma`` instead; putting the estimated bias into the error makes the weight free of a
    scale-dependent threshold. Returns alpha in [0, 1] and its ingredients (for logging).
    """
    n = analytic.shape[0]
    v1 = sample_statistics(analytic).variance_trace / n
    v0 = sample_statistics(likelihood).variance_trace / n
    comparison = compare_estimators(analytic, likelihood)
    vd = comparison.difference_standard_error ** 2
    covariance = 0.5 * (v1 + v0 - vd)
    # only a disagreement beyond the noise counts: the lower confidence bound of ||b||^2 (U - 2 se);
    # with fewer than 3 samples there is no standard error, hence no evidence of a bias
    if n < 3 or math.isnan(comparison.bias_sq_se):
        bias_sq = 0.0
    else:
        bias_sq = comparison.bias_sq - 2.0 * comparison.bias_sq_se
        bias_sq = max(bias_sq, 0.0) if math.isfinite(bias_sq) else math.inf
    denominator = bias_sq + vd
    if not (math.isfinite(v1) and math.isfinite(denominator)):
        alpha = 0.0  # a non-finite analytic spread: nothing to trust on the analytic side
    else:
        alpha = (v0 - covariance) / denominator if denominator > 0 else 1.0
    if not math.isfinite(alpha):
        alpha = 0.0
    alpha = min(max(alpha, 0.0), 1.0)
    return alpha, {"analytic_bias_sq": bias_sq, "analytic_mean_variance": v1, "likelihood_mean_variance": v0}
