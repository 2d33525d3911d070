import pytest
import torch

from reparam.core.compensation import DAMP, Compensation


def gram_with_scales(scales):
    inputs = torch.randn(4000, len(scales), dtype=torch.float64) * scales
    return inputs.T @ inputs


@pytest.mark.parametrize("act_order", [False, True])
def test_every_column_is_approximated_once_in_processing_order(act_order):
    gram = gram_with_scales(torch.tensor([1.0, 5.0, 0.5, 3.0, 2.0, 0.1], dtype=torch.float64))
    seen = []

    def approximate(col, pending):
        seen.append(col)
        return pending[:, 0]  # exact: nothing to compensate

    Compensation(gram, act_order=act_order).run(torch.randn(3, 6, dtype=torch.float64), approximate, block=4)
    assert seen == ([1, 3, 4, 0, 2, 5] if act_order else [0, 1, 2, 3, 4, 5])


def test_pending_columns_carry_the_compensated_weights_in_processing_order():
    # Rounding column j moves the columns after it by −error·U[j, k]/U[j, j]; the
    # reference here is the same recursion written out on the permuted weight.
    gram = gram_with_scales(torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64))
    weight = torch.randn(5, 4, dtype=torch.float64)
    compensation = Compensation(gram, act_order=True)
    order, update = compensation.order, compensation.update
    result = torch.empty_like(weight)

    def approximate(col, pending):
        result[:, col] = pending[:, 0].round()
        return result[:, col]

    compensation.run(weight, approximate, block=2)
    expected, work = torch.empty_like(weight), weight[:, order].clone()
    for i in range(4):
        expected[:, order[i]] = work[:, i].round()
        error = (work[:, i] - expected[:, order[i]]) / update[i, i]
        work[:, i:] -= error[:, None] * update[i, i:]
    torch.testing.assert_close(result, expected)


def test_importance_is_in_the_weight_s_own_column_order():
    # With uncorrelated inputs H is diagonal, so 1/[H⁻¹]_jj is H_jj (damped) whatever the order.
    diagonal = torch.tensor([3.0, 9.0, 1.0, 6.0], dtype=torch.float64)
    expected = diagonal + DAMP * diagonal.mean()
    for act_order in (False, True):
        torch.testing.assert_close(Compensation(torch.diag(diagonal), act_order=act_order).importance, expected)


@pytest.mark.parametrize("block", [16, 40, 128])
def test_steps_and_blocks_give_the_plain_column_by_column_recursion(block):
    # 70 columns: several 16-column steps per block, and a ragged last block and step.
    torch.manual_seed(0)
    gram = gram_with_scales(torch.rand(70, dtype=torch.float64) + 0.1)
    weight = torch.randn(6, 70, dtype=torch.float64)
    compensation = Compensation(gram)
    result = torch.empty_like(weight)

    def approximate(col, pending):
        result[:, col] = (pending[:, 0] * 2).round() / 2
        return result[:, col]

    compensation.run(weight, approximate, block=block)
    expected, work, update = torch.empty_like(weight), weight.clone(), compensation.update
    for i in range(70):
        expected[:, i] = (work[:, i] * 2).round() / 2
        work[:, i:] -= ((work[:, i] - expected[:, i]) / update[i, i])[:, None] * update[i, i:]
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_gram_it_is_given_is_left_as_it_was(act_order):
    gram = gram_with_scales(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))  # a dead channel is written over
    before = gram.clone()
    Compensation(gram, act_order=act_order)
    assert torch.equal(gram, before)
