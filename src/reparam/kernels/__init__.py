"""Fused hot paths. One file per op: the Triton kernel and its launcher, and
the torch reference that defines what it computes. Methods pick the Triton
path at call time for CUDA tensors only, importing the kernel file lazily, so
triton stays an optional dependency."""
