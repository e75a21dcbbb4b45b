"""Batched simulator state: a dataclass of named, batch-first torch tensors."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, TypeVar

import torch

S = TypeVar("S", bound="SimState")


@dataclasses.dataclass(eq=False, frozen=True)
class SimState:
    """Base class of every task's state (Brax-style, immutable).

    A task subclasses it, declared ``@dataclasses.dataclass(eq=False, frozen=True)``, with one field per
    physical quantity, each a tensor whose first dimension is the batch (``B``; 1 for a single env).
    Float fields carry gradients through ``differentiable_step``; integer fields (step counters) do
    not. Assigning a field raises ``dataclasses.FrozenInstanceError``: methods return new states
    (``replace``, ``where``, ...), so a state recorded in an autograd graph or held by an env is never
    changed behind its back. (Frozen covers the fields, not the tensors' contents: do not write into
    a state's tensors in place either.)
    """

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {}
    """Per-env shape of each field, e.g. ``{"pos": (2,), "step": ()}``; derived from the task's kernels
    when its ``DiffSim`` subclass is defined (see ``diffgym.core.contract``)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _field_names(cls)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in _field_names(type(self)))

    @property
    def batch_size(self) -> int:
        return int(getattr(self, _field_names(type(self))[0]).shape[0])

    @property
    def device(self) -> torch.device:
        return getattr(self, _field_names(type(self))[0]).device

    def map(self: S, fn: Callable[[torch.Tensor], torch.Tensor]) -> S:
        """A new state with ``fn`` applied to every field."""
        return type(self)(*(fn(t) for t in self.tensors()))

    def replace(self: S, **fields: torch.Tensor) -> S:
        """A new state with the given fields swapped in (``dataclasses.replace``); ``self`` is unchanged."""
        return dataclasses.replace(self, **fields)

    def detach(self: S) -> S:
        """Cut the autograd graph (e.g. at a segment boundary)."""
        return self.map(torch.Tensor.detach)

    def clone(self: S) -> S:
        return self.map(torch.Tensor.clone)

    def to(self: S, device: torch.device | str) -> S:
        return self.map(lambda t: t.to(device))

    def __getitem__(self: S, index) -> S:
        """Select envs along the batch dimension, keeping it (an int index gives batch 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda t: t[index])

    def where(self: S, mask: torch.Tensor, other: S) -> S:
        """Per env: ``other`` where ``mask`` (shape ``(B,)``, bool) is true, else ``self``.

        Gradients flow into whichever side is selected; used to splice freshly reset envs into a batch.
        """
        if type(other) is not type(self):
            raise TypeError(f"where() needs two {type(self).__name__}, got {type(other).__name__}")

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            m = mask.reshape(mask.shape + (1,) * (a.dim() - 1))
            return torch.where(m, b, a)

        return type(self)(*(pick(a, b) for a, b in zip(self.tensors(), other.tensors())))

    @classmethod
    def cat(cls: type[S], states: list[S]) -> S:
        """Concatenate states along the batch dimension."""
        columns = zip(*(s.tensors() for s in states))
        return cls(*(torch.cat(c, dim=0) for c in columns))


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields walks the class on every call; states ask for their fields on every step
    return tuple(f.name for f in dataclasses.fields(cls))
