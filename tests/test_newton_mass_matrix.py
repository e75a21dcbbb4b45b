"""The plain mass-matrix kernel that replaces Featherstone's tile kernel on the CPU
(``diffgym.core.newton_task._mass_matrix_kernel``): the tile kernel's ``H`` and gradients, bit for bit."""

import numpy as np
import pytest
import torch
import warp as wp

from tests.conftest import requires_newton

pytestmark = requires_newton


def _solver(num_envs: int, **options):
    import newton

    from diffgym.envs.franka_torque_reach import FrankaTorqueReach

    sim = FrankaTorqueReach()
    return newton.solvers.SolverFeatherstone(sim.model(num_envs), **{**sim.solver_options, **options})


def _launch(kernel, J, M, H, adjoint=False):
    kwargs = dict(adj_inputs=[J.grad, M.grad], adj_outputs=[H.grad], adjoint=True) if adjoint else {}
    wp.launch_tiled(kernel, dim=[J.shape[0]], inputs=[J, M], outputs=[H], block_dim=256, **kwargs)


def _random_inputs(rng, batch: int, num_joints: int, num_dofs: int):
    """``J``, an ``M`` of symmetric positive 6 x 6 blocks on the diagonal (as eval_rigid_mass writes it) and a
    seed for ``H``'s gradient, float32."""
    J_values = rng.standard_normal((batch, 6 * num_joints, num_dofs)).astype(np.float32)
    M_values = np.zeros((batch, 6 * num_joints, 6 * num_joints), np.float32)
    for body in range(num_joints):
        block = rng.standard_normal((batch, 6, 6)).astype(np.float32)
        M_values[:, 6 * body:6 * body + 6, 6 * body:6 * body + 6] = block @ block.transpose(0, 2, 1)
    return J_values, M_values, rng.standard_normal((batch, num_dofs, num_dofs)).astype(np.float32)


def _forward_and_adjoint(kernel, J_values, M_values, seed):
    """``H`` and, for ``seed`` as its gradient, the gradients of ``J`` and ``M``."""
    J = wp.array(J_values, requires_grad=True)
    M = wp.array(M_values, requires_grad=True)
    H = wp.zeros(seed.shape, dtype=float, requires_grad=True)
    _launch(kernel, J, M, H)
    H.grad.assign(seed)
    _launch(kernel, J, M, H, adjoint=True)
    return H.numpy(), J.grad.numpy(), M.grad.numpy()


def test_the_plain_kernel_gives_the_tile_kernels_mass_matrix_and_gradients_bit_for_bit():
    from diffgym.core.newton_task import _mass_matrix_kernel

    solver = _solver(5)
    ((size, tile_kernel),) = solver._tile_kernels_by_size.items()
    J_values, M_values, seed = _random_inputs(np.random.default_rng(0), solver._J_by_size[size].shape[0], *size)
    results = [_forward_and_adjoint(kernel, J_values, M_values, seed)
               for kernel in (tile_kernel, _mass_matrix_kernel(*size))]
    (tile_H, tile_dJ, tile_dM), (plain_H, plain_dJ, plain_dM) = results
    assert np.abs(tile_H).max() > 1.0 and np.abs(tile_dJ).max() > 1.0 and np.abs(tile_dM).max() > 0.1
    np.testing.assert_array_equal(plain_H, tile_H)
    np.testing.assert_array_equal(plain_dJ, tile_dJ)
    np.testing.assert_array_equal(plain_dM, tile_dM)


@pytest.mark.parametrize("size", [(2, 3), (7, 7), (4, 17)])
def test_the_plain_kernel_is_exact_whatever_warps_global_unroll_limit(size, monkeypatch):
    """Its adjoint is exact only with its loops unrolled: the module's own ``max_unroll`` covers them even
    when the global setting is lower (4 here) or the size beyond Warp's default limit (17 dofs)."""
    from diffgym.core.newton_task import _mass_matrix_kernel

    monkeypatch.setattr(wp.config, "max_unroll", 4)
    _mass_matrix_kernel.cache_clear()
    try:
        kernel = _mass_matrix_kernel(*size)
        num_joints, num_dofs = size
        J_values, M_values, seed = _random_inputs(np.random.default_rng(1), 3, num_joints, num_dofs)
        H_ref = np.zeros(seed.shape)
        dJ_ref = np.zeros(J_values.shape)
        for body in range(num_joints):
            J_b = J_values[:, 6 * body:6 * body + 6].astype(np.float64)
            M_b = M_values[:, 6 * body:6 * body + 6, 6 * body:6 * body + 6].astype(np.float64)
            H_ref += J_b.transpose(0, 2, 1) @ M_b @ J_b
            # d/dJ_b of sum(seed * J_b^T M_b J_b) = M_b J_b seed^T + M_b^T J_b seed
            dJ_ref[:, 6 * body:6 * body + 6] = M_b @ J_b @ seed.transpose(0, 2, 1) + M_b.transpose(0, 2, 1) @ J_b @ seed
        H, dJ, _ = _forward_and_adjoint(kernel, J_values, M_values, seed)
        np.testing.assert_allclose(H, H_ref, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dJ, dJ_ref, rtol=1e-4, atol=1e-3)
    finally:
        _mass_matrix_kernel.cache_clear()


@pytest.mark.parametrize("options, replaced", [({}, True), ({"fuse_cholesky": True}, False)])
def test_only_the_unfused_tile_kernel_is_replaced_on_the_cpu(options, replaced):
    from diffgym.core.newton_task import _plain_mass_matrix_on_cpu

    solver = _plain_mass_matrix_on_cpu(_solver(2, **options))
    ((_, kernel),) = solver._tile_kernels_by_size.items()
    assert _is_plain(kernel) == replaced


def _is_plain(kernel) -> bool:
    return kernel.func.__qualname__.startswith("_mass_matrix_kernel.")


def test_the_engines_solvers_use_the_plain_kernel():
    """Both the recorded step's solvers (one per substep) and the forward-only step's."""
    import gymnasium as gym

    venv = gym.make_vec("DiffGym/FrankaTorqueReach-v0", num_envs=2)
    venv.reset(seed=0)
    state = venv.get_state()
    action = torch.zeros((2, venv.single_action_space.shape[0]))
    venv.differentiable_step(state, action.clone().requires_grad_(True))
    with torch.no_grad():
        venv.differentiable_step(state, action)
    sim = venv.sim
    solvers = [*sim._taped[2]._alive[0], sim._forward_only[2]._alive[0]]
    assert len(solvers) == sim.substeps + 1
    for solver in solvers:
        ((_, kernel),) = solver._tile_kernels_by_size.items()
        assert _is_plain(kernel)
