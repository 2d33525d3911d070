"""The ``Quantizer`` base: a weight matrix (plus optional calibration
statistics) in, codes and scales out, and back. Pure functions of float64 CPU
tensors; modules only store what a quantizer returns."""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from .stats import LayerStats


class Quantizer(abc.ABC):
    """Turns W (out, in) into a compact code and back.

    ``requires_stats`` quantizers minimize the output error ‖(W − Ŵ)X‖ on
    calibration inputs X rather than the weight error ‖W − Ŵ‖.
    """

    name: ClassVar[str]
    requires_stats: ClassVar[bool] = False

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats | None) -> Any:
        """Codes and scales of a float64 (out, in) weight."""

    @abc.abstractmethod
    def dequantize(self, state: Any) -> torch.Tensor:
        """The float64 (out, in) weight that ``state`` represents."""
