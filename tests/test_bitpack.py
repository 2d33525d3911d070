import pytest
import torch

from reparam.core.bitpack import from_planes, pack_bits, to_planes, unpack_bits


def test_bit_k_of_byte_b_is_column_8b_plus_k():
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 0, 1]])
    assert pack_bits(bits).tolist() == [[129, 2]]


@pytest.mark.parametrize("columns", [1, 8, 13, 64, 100])
def test_pack_round_trip(columns):
    bits = torch.randint(0, 2, (3, 7, columns))
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 7, -(-columns // 8))
    assert torch.equal(unpack_bits(packed, columns), bits.to(torch.uint8))
    assert not (unpack_bits(packed, packed.shape[-1] * 8)[..., columns:]).any()  # padding is zero


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_planes_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 37))
    planes = to_planes(codes, bits)
    assert planes.shape == (bits, 5, 5)
    assert torch.equal(from_planes(planes, 37), codes)
