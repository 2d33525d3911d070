"""Small dense linear algebra the fits share."""
from __future__ import annotations

import torch

RIDGE = 1e-9  # relative to the mean diagonal: far below any real signal, enough to make a singular system solvable


def ridged_solve(normal: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x of (normal + ridge·I)·x = target for symmetric (…, n, n) ``normal``, batched or not.

    The tiny ridge keeps the solve defined when the system is singular: two
    bit-planes that coincide (a constant row), atoms that no column uses, a
    rank the quantized factor lost. ``normal`` is left as it was.
    """
    ridged = normal.clone()
    diagonal = ridged.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(RIDGE * diagonal.mean(-1, keepdim=True).clamp_min(1e-30))
    return torch.linalg.solve(ridged, target)
