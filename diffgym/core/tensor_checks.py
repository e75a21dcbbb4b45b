"""Validation of the float32 tensors users pass in (actions, action sequences, joint configurations):
one place for the checks and their one-line errors."""

from __future__ import annotations

from typing import Any

import torch


def check_float32(value: Any, name: str, shape: tuple[int | str, ...], axes: str,
                  device: torch.device | None = None, unit: str = "") -> torch.Tensor:
    """Return ``value`` if it is a finite ``torch.float32`` tensor of ``shape`` (on ``device`` unless
    None); raise ``TypeError`` (not a tensor) or ``ValueError`` in one line naming what was expected.

    A ``str`` entry of ``shape`` names a free dimension of any size >= 1 (``("T", 4, 2)``); ``unit`` is
    said after the shape (``" in rad"``); ``axes`` names the indices of non-finite entries in the error
    (``"(env, dim)"``, the first eight listed)."""
    # the expected form is spelled out only for an error: a trainer checks an action at every step
    def expected() -> str:
        free = [d for d in shape if isinstance(d, str)]
        return (f"a torch.float32 tensor of shape ({', '.join(str(d) for d in shape)}{',' if len(shape) == 1 else ''})"
                f"{unit}{f' on {device}' if device is not None else ''}"
                f"{' with ' + ', '.join(f'{d} >= 1' for d in free) if free else ''}")

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {expected()}, got {type(value).__name__}")
    if value.dim() != len(shape) or any(size < 1 if isinstance(d, str) else size != d
                                        for d, size in zip(shape, value.shape)):
        raise ValueError(f"{name} must be {expected()}, got shape {tuple(value.shape)}")
    if value.dtype != torch.float32:
        raise ValueError(f"{name} must be {expected()}, got dtype {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be {expected()}, got device {value.device}")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = [tuple(i) for i in (~finite).nonzero().tolist()[:8]]
        raise ValueError(f"{name} contains NaN or Inf at {axes} {bad}; it must be finite")
    return value


def describe_value(value: Any) -> str:
    """What a bad tensor argument was, for a one-line error."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__
