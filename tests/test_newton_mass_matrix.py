"""The plain mass-matrix kernel that replaces Featherstone's tile kernel on the CPU
(``diffgym.core.newton_task._mass_matrix_kernel``): the tile kernel's ``H`` and gradients, bit for bit."""

import numpy as np
import pytest
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


def test_the_plain_kernel_gives_the_tile_kernels_mass_matrix_and_gradients_bit_for_bit():
    from diffgym.core.newton_task import _mass_matrix_kernel

    solver = _solver(5)
    ((size, tile_kernel),) = solver._tile_kernels_by_size.items()
    rng = np.random.default_rng(0)
    num_joints, _ = size
    J_values = rng.standard_normal(solver._J_by_size[size].shape).astype(np.float32)
    M_values = np.zeros(solver._M_by_size[size].shape, np.float32)
    for body in range(num_joints):  # symmetric positive 6 x 6 blocks on the diagonal, as eval_rigid_mass writes
        block = rng.standard_normal((J_values.shape[0], 6, 6)).astype(np.float32)
        M_values[:, 6 * body:6 * body + 6, 6 * body:6 * body + 6] = block @ block.transpose(0, 2, 1)
    seed = rng.standard_normal(solver._H_by_size[size].shape).astype(np.float32)
    results = []
    for kernel in (tile_kernel, _mass_matrix_kernel(*size)):
        J = wp.array(J_values, requires_grad=True)
        M = wp.array(M_values, requires_grad=True)
        H = wp.zeros(seed.shape, dtype=float, requires_grad=True)
        _launch(kernel, J, M, H)
        H.grad.assign(seed)
        _launch(kernel, J, M, H, adjoint=True)
        results.append((H.numpy(), J.grad.numpy(), M.grad.numpy()))
    (tile_H, tile_dJ, tile_dM), (plain_H, plain_dJ, plain_dM) = results
    assert np.abs(tile_H).max() > 1.0 and np.abs(tile_dJ).max() > 1.0 and np.abs(tile_dM).max() > 0.1
    np.testing.assert_array_equal(plain_H, tile_H)
    np.testing.assert_array_equal(plain_dJ, tile_dJ)
    np.testing.assert_array_equal(plain_dM, tile_dM)


@pytest.mark.parametrize("options, replaced", [({}, True), ({"fuse_cholesky": True}, False),
                                               ({"use_tile_gemm": False}, False)])
def test_only_the_unfused_tile_kernel_is_replaced_on_the_cpu(options, replaced):
    from diffgym.core.newton_task import _mass_matrix_kernel, _plain_mass_matrix_on_cpu

    solver = _plain_mass_matrix_on_cpu(_solver(2, **options))
    kernels = getattr(solver, "_tile_kernels_by_size", {}) or {}
    assert all((kernel is _mass_matrix_kernel(*size)) == replaced for size, kernel in kernels.items())
    assert bool(kernels) or not replaced
