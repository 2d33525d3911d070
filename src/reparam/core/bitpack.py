"""Bit-planes: q-bit codes as q planes of bits, 8 weights per byte.

Plane i of a code c holds bit i of c. Bit k of byte b of a row is column
8·b + k, so the columns of byte b are contiguous: a lookup table over 8
activations is indexed directly by the byte.
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_width(columns: int) -> int:
    """Bytes per row of one plane: columns padded to a multiple of 8."""
    return -(-columns // 8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) tensor of 0/1 → (..., ⌈n/8⌉) uint8; padding bits are 0."""
    n = bits.shape[-1]
    pad = packed_width(n) * 8 - n
    bits = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, 8)
    return (bits << _SHIFTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., bytes) uint8 → (..., columns) uint8 of 0/1."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :columns]


def to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (out, in) in [0, 2^bits) → packed planes (bits, out, ⌈in/8⌉)."""
    codes = codes.to(torch.int64)
    return torch.stack([pack_bits((codes >> i) & 1) for i in range(bits)])


def from_planes(planes: torch.Tensor, columns: int) -> torch.Tensor:
    """Packed planes (bits, out, bytes) → integer codes (out, columns), int64."""
    bits = unpack_bits(planes, columns).to(torch.int64)
    weights = (1 << torch.arange(planes.shape[0], device=planes.device)).view(-1, 1, 1)
    return (bits * weights).sum(0)
