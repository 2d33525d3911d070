import pytest
import torch

from reparam.kernels.bitplane import planes_from_codes


def random_bitplane_layer(out_features, in_features, bits, group_size):
    """(planes, coef, offset, bias) of a random bit-plane layer, padding columns zero as stored."""
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 2 ** bits, (out_features, groups * group_size))
    codes[:, in_features:] = 0
    coef = torch.randn(bits, out_features, groups) * 0.1
    offset = torch.randn(out_features, groups) * 0.1
    return planes_from_codes(codes, bits), coef, offset, torch.randn(out_features)


@pytest.fixture
def random_layer():
    """``random_layer(out, in, bits, group_size)`` → (planes, coef, offset, bias)."""
    return random_bitplane_layer
