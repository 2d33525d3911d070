import torch

from reparam.core.linalg import RIDGE, ridged_solve


def test_a_singular_system_is_solved_with_the_ridge_and_left_as_it_was():
    basis = torch.randn(5, 3, dtype=torch.float64)
    normal = basis @ basis.T  # rank 3 of 5: no plain solve
    target = torch.randn(5, 2, dtype=torch.float64)
    before = normal.clone()
    x = ridged_solve(normal, target)
    assert torch.equal(normal, before)
    ridged = normal + RIDGE * normal.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    # The ridged system is solvable but ill-conditioned (cond ~3e9 here): a backward-stable solve leaves a residual
    # of order eps·‖A‖·‖x‖, and where in that range it lands depends on the LAPACK build's code path for the CPU
    # (rtol 1e-6 passed on a Xeon and failed by 3% on a Zen 5).
    bound = 10 * torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(ridged, 2) * x.abs().max()
    assert ((ridged @ x - target).abs() <= bound).all()


def test_batched_systems_get_each_their_own_ridge():
    scales = torch.tensor([1.0, 1e6], dtype=torch.float64)
    normal = torch.ones(2, 2, 2, dtype=torch.float64) * scales[:, None, None]  # singular, very different sizes
    target = torch.ones(2, 2, dtype=torch.float64) * scales[:, None]
    x = ridged_solve(normal, target)
    for i in range(2):
        torch.testing.assert_close(x[i], ridged_solve(normal[i], target[i]), rtol=1e-12, atol=0)
    torch.testing.assert_close(x.sum(-1), torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=0)
