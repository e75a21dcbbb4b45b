"""Running observation normalization with one update rule shared by every trainer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffgym.training.spec import NormalizerSpec


class ObservationNormalizer(nn.Module):
    """``clip((obs - mean) / sqrt(var + epsilon), -clip, clip)`` with running mean and variance.

    ``update`` merges a batch into the running statistics with the parallel (Chan et al.) form of
    Welford's algorithm, so the result is exactly the mean and (population) variance of every
    observation seen, independent of how they were batched. The statistics are float64 buffers: they
    are saved in ``state_dict``, move with ``.to(device)`` and are never touched by an optimizer.
    ``forward`` is differentiable in ``obs`` (gradient ``1 / sqrt(var + epsilon)`` inside the clip
    range), so analytic policy gradients flow through it. With ``spec.enabled`` false it is the identity
    and ``update`` is a no-op.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, obs_dim: int, spec: NormalizerSpec):
        super().__init__()
        self.obs_dim, self.spec = int(obs_dim), spec
        self.register_buffer("mean", torch.zeros(self.obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(self.obs_dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self._cached_statistics: tuple | None = None  # (mean, var, their versions and dtype, results): _statistics

    def _statistics(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, sqrt(var + epsilon))`` in ``dtype``, computed once per change of the statistics.

        A trainer normalizes at every env step but updates the statistics once per update: the cache holds
        the two tensors until ``mean`` or ``var`` is replaced (``.to``) or written in place (``update``,
        ``load_state_dict``, a caller's ``copy_``), which the buffers' version counters record. The cached
        tensors are never written in place, so a graph that saved them stays valid; their values are those
        the computation below gives, bit for bit."""
        mean, var = self.mean, self.var
        # inference tensors keep no version counter, and tensors made under inference mode cannot be saved
        # for a later backward: neither is cached
        if mean.is_inference() or var.is_inference() or torch.is_inference_mode_enabled():
            return mean.to(dtype), torch.sqrt(var + self.spec.epsilon).to(dtype)
        versions = (mean._version, var._version, dtype)
        cached = self._cached_statistics
        if cached is None or cached[0] is not mean or cached[1] is not var or cached[2] != versions:
            cached = self._cached_statistics = (mean, var, versions, mean.to(dtype),
                                                 torch.sqrt(var + self.spec.epsilon).to(dtype))
        return cached[3], cached[4]

    @torch.no_grad()
    def update(self, obs_batch: torch.Tensor | np.ndarray) -> None:
        """Merge a batch of observations ``(..., obs_dim)`` into the running statistics."""
        if not self.spec.enabled:
            return
        batch = torch.as_tensor(obs_batch).detach().to(device=self.mean.device, dtype=torch.float64)
        if batch.shape[-1:] != (self.obs_dim,):
            raise ValueError(f"observations must have last dimension {self.obs_dim}, got shape {tuple(batch.shape)}")
        batch = batch.reshape(-1, self.obs_dim)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(dim=0)
        batch_var = batch.var(dim=0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        # Chan et al.: M2 = M2_a + M2_b + delta^2 * n_a * n_b / (n_a + n_b)
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean.copy_(self.mean + delta * (n / total))
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalized, clipped observations in ``obs``'s dtype; differentiable in ``obs``."""
        if not self.spec.enabled:
            return obs
        mean, std = self._statistics(obs.dtype)
        return ((obs - mean) / std).clamp(-self.spec.clip, self.spec.clip)

    def extra_repr(self) -> str:
        return f"obs_dim={self.obs_dim}, enabled={self.spec.enabled}, clip={self.spec.clip}"
