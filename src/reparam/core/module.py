"""The contract every compressed-layer wrapper follows."""
from __future__ import annotations

import abc
import contextlib
from typing import ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import MethodConfig
from .stats import LayerStats


class ReparamModule(nn.Module, abc.ABC):
    """A drop-in replacement for ``nn.Linear`` whose weight is W = f(θ).

    Subclasses follow ``nn.Linear``'s own shape: ``__init__`` builds an empty
    skeleton (buffers of the right shapes, no computation), so a saved model
    can be rebuilt on any device, the meta device included, and then filled by
    ``load_state_dict``; ``from_linear`` builds the skeleton and fits θ.

    The state dict holds θ exactly as stored (packed bits, sparse values and
    indices), so its bytes are the real compressed size.
    """

    # For a wrapper whose fit treats output rows independently given the
    # statistics: the dimension of each of its tensors that holds the output
    # rows, so that a distributed conversion may fit a costly layer in row
    # slices on several ranks and put them together. None: rows are fitted jointly.
    ROW_DIMS: ClassVar[Mapping[str, int] | None] = None
    # Attributes (in the instance __dict__) where the forward keeps tensors it derived
    # from θ for speed; see ``release_caches``.
    CACHES: ClassVar[tuple[str, ...]] = ()
    # Floating-point tensors of θ that block-output tuning may adjust after the fit (``reparam.tuning``);
    # supports and indices stay as fitted, and codes are learned only where ``tuning`` says so.
    TUNABLE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, config: MethodConfig, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        # The layer's compute dtype; compressed tensors may be stored in other dtypes.
        self.dtype = dtype or torch.get_default_dtype()
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=self.dtype))
                     if bias else None)

    @classmethod
    def empty_like(cls, linear: nn.Module, config: MethodConfig):
        """The skeleton that ``linear`` (an ``nn.Linear`` or a transformers ``Conv1D``)
        would be converted into, with uninitialized θ."""
        in_features, out_features = linear_shape(linear)
        return cls(in_features, out_features, linear.bias is not None, config,
                   device=linear.weight.device, dtype=linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: MethodConfig, stats: LayerStats | None = None):
        """Fit θ to ``linear``'s weight (and ``stats``, for data-aware configs).

        ``linear`` is an ``nn.Linear`` or a transformers ``Conv1D`` (same map,
        weight stored transposed). Fitting runs in float64 on CPU; θ is stored
        in the layer's dtype on its device.
        """
        module = cls.empty_like(linear, config)
        with torch.no_grad():
            module.fit(linear_weight(linear).detach().to("cpu", torch.float64), stats)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    @abc.abstractmethod
    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        """Fill θ from a float64 CPU weight (out, in), in place."""

    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` if ``state`` (this module's tensors, as ``load``
        is about to put them in) holds values the forward cannot use. ``load``
        has already checked keys, shapes, dtypes and finiteness; subclasses
        check what indexes or scales (e.g. indices within range)."""

    @contextlib.contextmanager
    def tuning(self, *, codes: bool) -> Iterator[tuple[str, ...]]:
        """Block tuning's hold on this module (``reparam.tuning``): yields the names of the tensors it adjusts,
        ``TUNABLE``. With ``codes``, a module whose θ holds discrete codes may also have them learned, through
        a float tensor it adds for the time (``QuantizedLinear``)."""
        yield self.TUNABLE

    def stored_value(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` for tensor ``name`` (one of ``TUNABLE``) as it would be stored: what the forward sees."""
        return value.to(getattr(self, name).dtype)

    def tuning_step(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The size of tensor ``name``'s values (``value``, float32), broadcastable to it: block tuning's steps
        are a fraction of it. By default its mean |value|."""
        return value.abs().mean()

    @abc.abstractmethod
    def materialize(self) -> torch.Tensor:
        """The dense (out, in) weight in the layer's dtype."""

    def differentiable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in plain torch operations, which autograd follows back to θ (block tuning,
        ``reparam.tuning``; the compressed kernels of ``forward`` need not be differentiable).
        By default F.linear of ``materialize()``."""
        return F.linear(x, self.materialize(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference path; subclasses override it with the compressed one.
        return self.differentiable_forward(x)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for code that reads ``layer.weight`` (computed, not stored)."""
        return self.materialize()

    def release_caches(self) -> None:
        """Drop what the forward derived and kept for speed (the names in ``CACHES``;
        rebuilt on the next call). The conversion pipeline calls it on each block it
        has run, so derived copies (dense_sparse's dense S: k·in floats a layer) do
        not pile up across a model's blocks during conversion."""
        for name in self.CACHES:
            self.__dict__.pop(name, None)

    def to_linear(self) -> nn.Linear:
        """Bake θ back into a plain ``nn.Linear`` (like peft's ``merge_and_unload``)."""
        weight = self.materialize().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items() if k != "method")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {fields}")


# transformers' GPT-2 style linear layer: y = x @ W + b with W stored (in, out).
# Matched by name so that reparam never imports transformers.
CONV1D = ("transformers.pytorch_utils", "Conv1D")


def is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) == CONV1D


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer's weight read as a linear map: ``nn.Linear`` stores
    (out, in), ``Conv1D`` (in, out); conv kernels flatten to (out, in·k…)."""
    weight = module.weight
    if is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    return weight.reshape(weight.shape[0], -1).shape[1], weight.shape[0]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or ``Conv1D`` (a transposed view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def row_slice(linear: nn.Module, rows: slice) -> nn.Linear:
    """An ``nn.Linear`` computing output rows ``rows`` of ``linear`` (an ``nn.Linear``
    or ``Conv1D``), its tensors views of ``linear``'s (nothing is copied)."""
    weight = linear_weight(linear)[rows].detach()
    part = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias[rows].detach(), requires_grad=False)
    return part


def state_nbytes(module: nn.Module) -> int:
    """Bytes of everything the module saves: parameters and persistent buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def state_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())
