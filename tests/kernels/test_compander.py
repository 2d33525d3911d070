"""The Triton compander kernels against their torch reference, run on CPU
under TRITON_INTERPRET=1 (set in tests/conftest.py)."""
import pytest
import torch

from reparam.kernels.compander import (CompanderFunction, compander_backward_triton, compander_forward_triton,
                                       compander_reference)


@pytest.mark.parametrize("shape", [(1,), (37, 29), (3, 4, 5, 7), (2048 + 3,)])  # odd sizes cross block edges
@pytest.mark.parametrize("a, b", [(0.5, 1.0), (8.5, 0.6), (1.3, 2.5)])
def test_forward_matches_reference(shape, a, b):
    v = torch.randn(shape) * 3
    a, b = torch.tensor(a), torch.tensor(b)
    torch.testing.assert_close(compander_forward_triton(v, a, b), compander_reference(v, a, b),
                               rtol=2e-6, atol=2e-6)


def test_forward_is_accurate_far_from_zero():
    v = torch.tensor([-1e4, -50.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 50.0, 1e4])
    a, b = torch.tensor(1.0), torch.tensor(1.0)
    torch.testing.assert_close(compander_forward_triton(v, a, b), torch.atan(v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_gradients_match_torch_autograd_on_the_reference(dtype, atol):
    v = (torch.randn(33, 65) * 2).to(dtype)
    grad = torch.randn(33, 65).to(dtype)
    a = torch.tensor(1.7, requires_grad=True)
    b = torch.tensor(0.8, requires_grad=True)
    v_ref = v.clone().requires_grad_()
    compander_reference(v_ref, a, b).backward(grad)
    dv, da, db = compander_backward_triton(grad, v, a.detach(), b.detach())
    torch.testing.assert_close(dv, v_ref.grad, atol=atol, rtol=1e-2)
    # Sums over 2,145 elements: relative tolerance in the accumulation precision.
    torch.testing.assert_close(da, a.grad, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-3)
    torch.testing.assert_close(db, b.grad, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-3)


def test_autograd_function_matches_reference_end_to_end():
    v1 = torch.randn(10, 12, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_()
    log_a1, log_b1 = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.2, requires_grad=True)
    log_a2, log_b2 = log_a1.detach().clone().requires_grad_(), log_b1.detach().clone().requires_grad_()
    CompanderFunction.apply(v1, log_a1.exp(), log_b1.exp()).square().sum().backward()
    compander_reference(v2, log_a2.exp(), log_b2.exp()).square().sum().backward()
    for got, want in ((v1.grad, v2.grad), (log_a1.grad, log_a2.grad), (log_b1.grad, log_b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
