"""Pre-contact gradients for the penalty-contact tasks (TPush, PointNav2D): contact forces that reach out
to a distance in the backward pass only.

A penalty contact exerts exactly zero force, with exactly zero derivatives, while two bodies are apart,
so the gradient of anything a contact would change is zero until they touch. Following Contacts From
Distance (Paulus, Geist et al., arXiv 2506.14186), a task built with ``contact_gradient_distance=D > 0``
keeps its forward pass exact and differentiates a *surrogate* instead: the same step with every contact's
elastic force extended by a tail that reaches out to distance ``D`` (:func:`pre_contact_profile`).

The straight-through estimator works per control step: the step kernel runs the exact substeps (whose
values it returns, with no gradient) and the surrogate's substeps from the same inputs (whose gradient it
returns, with no value), joined output by output by :func:`straight_through`. So the forward pass is the
exact step bit for bit, and the backward pass of one step is exactly the vector-Jacobian product of the
surrogate step (next state, observation and reward) at the same inputs, which tests check against
central differences of the surrogate's own forward pass (:func:`surrogate_forward`). Over a rollout, the
gradient chains the surrogate steps' Jacobians along the exact trajectory.
"""

# No ``from __future__ import annotations``: Warp reads the generated functions' annotations at run time.
import copy
import functools
import math
import numbers
import re
from typing import Any

import warp as wp


def check_contact_gradient_distance(value: Any) -> float:
    """The option's value as a float; ``ValueError`` unless it is a finite distance >= 0 [m]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"contact_gradient_distance must be a finite distance >= 0 in m (0: exact gradients), "
                         f"got {value!r}")
    return float(value)


@wp.func
def smoothstep5(u: float) -> float:
    """0 for u <= 0, 1 for u >= 1, ``u^3 (10 - 15 u + 6 u^2)`` between: C2, like the tasks' force laws."""
    t = wp.clamp(u, 0.0, 1.0)
    return t * t * t * (10.0 + t * (6.0 * t - 15.0))


@wp.func
def pre_contact_profile(gap: float, distance: float, smoothing: float) -> float:
    """The surrogate's extra elastic force per unit of its peak, as a function of the signed ``gap``
    between the surfaces [m] (negative when penetrating): rising from 0 at ``gap = distance`` to 1 at
    touch, then back to 0 at a penetration of ``smoothing`` (the exact law's onset band). Beyond that the
    surrogate is the exact law, value and derivatives, so gradients in full contact are the exact ones.
    C2 in the gap; the tasks keep the peak small enough that force still grows with depth through the band.
    """
    return (1.0 - smoothstep5(gap / distance)) * (1.0 - smoothstep5(-gap / smoothing))


PEAK_FRACTION = 0.125
"""The tail's peak, at touch, is ``PEAK_FRACTION * k * s`` for a contact of stiffness ``k`` and onset band
``s``: an eighth of the spring force of a penetration ``s`` deep (0.625 N on TPush, 5 N on PointNav2D).
At that height the surrogate force still rises monotonically with depth across the band where the tail
fades (per unit depth ``u = d / s`` into the band, the exact force rises at a rate of at least ``k/2`` on
TPush and ``k u`` on PointNav2D; the tail falls at a rate of at most ``0.125 * 30 u (1 - u)^2 k``)."""


@functools.cache
def straight_through(dtype: Any) -> Any:
    """A Warp function ``(exact, surrogate) -> exact`` on values of ``dtype`` whose adjoint passes the
    output's gradient to ``surrogate`` alone: the exact value, the surrogate's derivative."""

    def forward(exact: dtype, surrogate: dtype) -> dtype:
        return exact

    def adjoint(exact: dtype, surrogate: dtype, adj_ret: dtype):
        wp.adjoint[surrogate] += adj_ret

    # one function per value type, named after it (Warp's custom adjoints cannot be generic)
    name = "straight_through_" + re.sub(r"\W+", "_", wp.types.type_repr(dtype))
    function = wp.func(forward, name=name, module="unique")
    wp.func_grad(function)(adjoint)
    return function


def install(sim: Any, distance: float) -> None:
    """Make ``sim`` differentiate the surrogate when ``distance`` > 0: its step kernel becomes the task's
    ``straight_through_step_kernel`` (the exact kernel's arguments). At 0 it keeps the exact kernel, so
    the option costs nothing unless it is used."""
    sim.contact_gradient_distance = distance
    if distance > 0:
        sim.step_kernel = type(sim).straight_through_step_kernel


def surrogate_forward(sim: Any) -> Any:
    """A copy of ``sim`` whose forward pass runs the surrogate as well (its step kernel the task's
    ``surrogate_step_kernel``, differentiated by Warp's ordinary adjoint): for tests, which compare the
    straight-through gradient with central differences of this forward pass. Not a physical simulator."""
    if not sim.contact_gradient_distance > 0:
        raise ValueError("surrogate_forward needs a sim built with contact_gradient_distance > 0")
    twin = copy.copy(sim)
    twin.step_kernel = type(sim).surrogate_step_kernel
    return twin
