"""What quantization methods share: the config fields, automatic bit
allocation across layers, and ``QuantizedLinear``, the layer that stores
codes as bit-planes plus per-group parameters.

A quantization method is its ``Quantizer`` (how a group is fitted) plus a
config subclass that builds it; everything else lives here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from .budget import Allocator, budget_bytes
from .config import ConfigError, MethodConfig, check_choice, check_flag
from .module import ReparamModule
from .quantizer import PARAM_DTYPE, Quantizer
from .registry import parse_config
from .stats import LayerStats
from ..kernels.bitplane import bitplane_linear, decode_weight, planes_from_codes
from ..progress import progress_bar

FITS = ("auto", "rtn", "gptq")
ROW_GROUP = "row"  # group_size value: one group (one set of scales) per row
LINEAR_FORM_CACHE = "_linear_form_cache"  # the kernels' coefficients, kept per params tensor (``_cached_linear_form``)
LATENT = "latent"  # block tuning's float stand-in for the codes (``QuantizedLinear.tuning``)
# Its tuning step, relative to its mean |value|, against 1 for the scales. MiniLM, rotated shift_add 3-bit row,
# BlockTuning(epochs=4, batches_per_step=1): fidelity 0.9822 at 1, 0.9854 at 3; at 10 every block's tuning
# raised its error and was dropped (0.9733, as fitted).
LATENT_STEP = 3.0


@dataclasses.dataclass(frozen=True)
class QuantizedConfig(MethodConfig):
    """Fields every quantization method has.

    ``bits="auto"`` with ``target_bits``: ``convert`` gives each layer of the
    rule its own width from ``BITS`` so that the stored bits per weight over
    the rule's layers (scales included) stay within ``target_bits``, with the
    least total output error (``core.budget``; ``method: "auto"`` chooses
    across methods the same way). ``group_size=None`` is
    ``default_group_size(in_features)`` per layer, ``"row"`` one group per
    row (``row_group_size``). ``fit="auto"`` is the
    compensated (GPTQ) fit when ``convert`` gets calibration data and
    round-to-nearest when it does not;
    ``act_order`` runs the compensated fit in GPTQ's activation order.
    """

    BITS: ClassVar[tuple[int, ...]]
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "bits": 'bits per weight (one of BITS), or "auto" with target_bits: a width per layer',
        "target_bits": 'with bits="auto": stored bits per weight over the rule\'s layers, scales included',
        "group_size": "columns sharing one set of scales (a multiple of 32); None: the largest of 128, 64, 32 "
                      "dividing the layer's width; \"row\": one group per row (fewest scale bytes)",
        "fit": '"auto" (GPTQ with calibration data, else round-to-nearest), "rtn" or "gptq"',
        "act_order": "compensated fit in GPTQ's activation order (columns by decreasing activation energy)",
    }
    bits: int | str = 4
    target_bits: float | None = None
    group_size: int | str | None = None
    fit: str = "auto"
    act_order: bool = True  # raised MiniLM's fidelity for every method and width measured (docs/shift_add.md)
    # The compensated fit's time, measured at 1 thread on SmolLM2's shapes (docs/distributed.md): the
    # Hessian's Cholesky factorizations, ∝ in³, and the column loop, ∝ in per output row; ROW_FIT_COST
    # is one row's share of the loop relative to in² of factorization.
    ROW_FIT_COST: ClassVar[float] = 4400

    def __post_init__(self):
        if self.bits == "auto":
            if self.target_bits is None:
                raise ConfigError(f"{self.method}: bits='auto' needs target_bits, the average bits per weight, "
                                  f"e.g. target_bits=2.5")
            if isinstance(self.target_bits, bool) or not isinstance(self.target_bits, (int, float)) \
                    or self.target_bits <= 0:
                raise ConfigError(f"{self.method}: target_bits={self.target_bits!r} must be a positive number "
                                  "(stored bits per weight, scales included)")
        else:
            if not isinstance(self.bits, int) or isinstance(self.bits, bool):  # 3.0 == 3 would pass the choice
                raise ConfigError(f"{self.method}: bits={self.bits!r} must be an integer from {list(self.BITS)}, "
                                  "or 'auto' with target_bits")
            check_choice(self.method, "bits", self.bits, self.BITS + ("auto",))
            if self.target_bits is not None:
                raise ConfigError(f"{self.method}: target_bits is only used with bits='auto'; "
                                  f"drop it or set bits='auto'")
        if self.group_size not in (None, ROW_GROUP) and (not isinstance(self.group_size, int) or self.group_size < 32
                                                         or self.group_size % 32):
            raise ConfigError(f"{self.method}: group_size={self.group_size!r} must be a positive multiple of 32 "
                              f"(whole bytes per group, and the kernel's tile) or {ROW_GROUP!r}; 128 is the usual "
                              "choice")
        check_choice(self.method, "fit", self.fit, FITS)
        check_flag(self.method, "act_order", self.act_order)

    def quantizer(self, bits: int | None = None) -> Quantizer:
        """The quantizer for this config (at ``bits``, default this config's)."""
        raise NotImplementedError

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        # A group wider than the row only adds zero padding; bounded so that a
        # damaged file's group_size=2**40 never reaches the allocator.
        widest = max(128, row_group_size(in_features))
        if isinstance(self.group_size, int) and self.group_size > widest:
            raise ConfigError(f"{self.method}: group_size={self.group_size} is wider than layer '{name}' "
                              f"({in_features} inputs); use group_size ≤ {widest}")

    def requires_calibration(self) -> bool:
        return self.fit == "gptq"

    def uses_calibration(self) -> bool:
        return self.fit != "rtn"

    def allocator(self, modules: Mapping[str, nn.Module]) -> Allocator | None:
        if self.bits != "auto":
            return None
        widths = [self.replace(bits=bits, target_bits=None) for bits in self.BITS]
        return Allocator(widths, budget_bytes(modules.values(), self.target_bits, None))

    def fitting_cost(self, in_features: int, out_features: int) -> float:
        return float(in_features) * (in_features * in_features + self.ROW_FIT_COST * out_features)

    def cheap(self) -> "QuantizedConfig":
        # Round-to-nearest ranks widths and groups like the compensated fit, at a fraction of its time.
        return self.replace(fit="rtn")


def group_size_for(group_size: int | str | None, in_features: int) -> int:
    """A config's ``group_size`` as the layer stores it: None and ``"row"`` resolved for ``in_features``."""
    if group_size is None:
        return default_group_size(in_features)
    return row_group_size(in_features) if group_size == ROW_GROUP else group_size


def row_group_size(in_features: int) -> int:
    """One group per row: the row's width rounded up to whole kernel tiles of 32 columns."""
    return -(-in_features // 32) * 32


def default_group_size(in_features: int) -> int:
    """The largest of 128, 64, 32 that divides ``in_features`` (no padded columns), else 128.

    SmolLM2's 576-wide inputs get 64: with 128 they pad to 640, and affine
    4-bit with group 64 was both smaller and better (perplexity 17.11 vs 17.28).
    """
    return next((size for size in (128, 64, 32) if in_features % size == 0), 128)


def parse_base(method: str, base: Any) -> QuantizedConfig:
    """The quantizer config a composed method stores its tensors with (a dict or a config)."""
    config = parse_config(base)
    if not isinstance(config, QuantizedConfig) or config.bits == "auto":
        raise ConfigError(f"{method}: base={base!r} must be a quantization method with integer bits, "
                          "e.g. {'method': 'affine', 'bits': 4}")
    return config


def check_size(method: str, count_key: str, count: Any, fraction_key: str, fraction: Any) -> None:
    """Exactly one of a positive integer ``count`` (e.g. a rank) or a positive number ``fraction``."""
    if (count is None) == (fraction is None):
        raise ConfigError(f"{method}: set exactly one of {count_key} or {fraction_key}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"{method}: {count_key}={count!r} must be a positive integer")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or fraction <= 0):
        raise ConfigError(f"{method}: {fraction_key}={fraction!r} must be a positive number")


@dataclasses.dataclass(frozen=True)
class QuantizedBaseConfig(MethodConfig):
    """A method whose tensors are stored by a ``base`` quantization config (kept as a plain dict, so the config
    stays JSON)."""

    base: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "affine", "bits": 4})

    def __post_init__(self):
        base = self.base.to_dict() if isinstance(self.base, MethodConfig) else dict(self.base)
        object.__setattr__(self, "base", parse_base(self.method, base).to_dict())

    @property
    def base_config(self) -> QuantizedConfig:
        return parse_base(self.method, self.base)

    def requires_calibration(self) -> bool:
        return self.base_config.requires_calibration()

    def cheap(self) -> "QuantizedBaseConfig":
        return self.replace(base=self.base_config.cheap().to_dict())


@dataclasses.dataclass(frozen=True)
class ComposedConfig(QuantizedBaseConfig):
    """A composed method: tensors stored by a ``base`` quantization config,
    with a rank set by ``rank`` or by the subclass's ``SIZE_FIELD``."""

    SIZE_FIELD: ClassVar[str]
    rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_size(self.method, "rank", self.rank, self.SIZE_FIELD, getattr(self, self.SIZE_FIELD))

    def uses_calibration(self) -> bool:
        return True  # the low-rank part is whitened whenever statistics are there

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        if self.rank is not None and self.rank > min(in_features, out_features):
            raise ConfigError(f"{self.method}: rank={self.rank} exceeds min(in, out)="
                              f"{min(in_features, out_features)} of layer '{name}'; lower the rank or use "
                              f"{self.SIZE_FIELD}")


class QuantizedLinear(ReparamModule):
    """``nn.Linear`` with W stored as ``bits`` bit-planes and per-group parameters.

    State: ``planes`` (bits, padded_in/8, out) uint8, rows padded with zero
    bits to whole groups (byte-major, see ``kernels.bitplane``), and
    ``params`` (out, groups, P) fp16; the bias is
    kept as it was. The forward never builds W on CPU at small batch, nor on
    CUDA (see ``reparam.kernels.bitplane``).
    """

    # Every fit (round-to-nearest, compensated) quantizes each output row on its own, given the Hessian.
    ROW_DIMS = {"planes": 2, "params": 0, "bias": 0}
    CACHES = (LINEAR_FORM_CACHE,)
    TUNABLE = ("params",)

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizedConfig, *,
                 device=None, dtype=None):
        if not isinstance(config.bits, int):
            raise ConfigError(f"{config.method}: bits='auto' is resolved per layer by reparam.convert; "
                              "give this layer an integer bits")
        if not isinstance(config.group_size, int):  # stored concretely: a saved file never depends on the default
            config = config.replace(group_size=group_size_for(config.group_size, in_features))
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        self.quantizer = config.quantizer()
        groups = self.quantizer.num_groups(in_features)
        self.padded_in_features = groups * config.group_size
        self.register_buffer("planes", torch.zeros(config.bits, self.padded_in_features // 8, out_features,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("params", torch.zeros(out_features, groups, self.quantizer.params_per_group,
                                                   dtype=PARAM_DTYPE, device=device))

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        gram = stats.gram if stats is not None and self.config.fit != "rtn" else None
        codes, params = self.quantizer.quantize(weight, gram, act_order=self.config.act_order)
        codes = nn.functional.pad(codes, (0, self.padded_in_features - self.in_features))
        self.planes.copy_(planes_from_codes(codes, self.config.bits))
        self.params.copy_(params)

    @contextlib.contextmanager
    def tuning(self, *, codes: bool) -> Iterator[tuple[str, ...]]:
        """With ``codes``, tuning learns the codes too (learned rounding, as in EfficientQAT's block stage): a
        float weight ``latent``, the decoded one to begin with, moves with the straight-through gradient, and
        the forward uses the level nearest to each of its weights. When tuning ends, the planes are rewritten
        from those nearest levels (unchanged if tuning did not keep its values)."""
        with super().tuning(codes=codes) as names:
            if not codes:
                yield names
                return
            self.register_buffer(LATENT, self._decoded(), persistent=False)
            try:
                yield names + (LATENT,)
                with torch.no_grad():
                    self.planes.copy_(planes_from_codes(self._nearest_codes(self._buffers[LATENT]), self.config.bits))
            finally:
                del self._buffers[LATENT]

    def stored_value(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name == LATENT:
            return value
        return self.quantizer.round_params(value).to(PARAM_DTYPE)

    def tuning_step(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name == LATENT:
            return LATENT_STEP * value.abs().mean()
        # The P parameters of a group are of different kinds (affine's scale and zero point; shift_add's α_i, each
        # about half the one before): one size per kind.
        return value.abs().mean((0, 1))

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(coef (bits, out, groups), offset (out, groups)) in float32; see ``kernels.bitplane``."""
        return self.quantizer.linear_form(self.params.float())

    def materialize(self) -> torch.Tensor:
        latent = self._buffers.get(LATENT)
        weight = self._decoded() if latent is None else self._nearest_levels(latent)
        return weight[:, :self.in_features].to(self.dtype)

    def _decoded(self) -> torch.Tensor:
        """The (out, padded in) float32 weight the planes and params hold."""
        return decode_weight(self.planes, *self.linear_form(), self.config.group_size, torch.float32)

    def _nearest_codes(self, latent: torch.Tensor) -> torch.Tensor:
        """The code of the level nearest to each weight of ``latent`` (padded columns: code 0, as fitted)."""
        codes = self.quantizer.encode_all(self.params.detach().float(), latent.detach())
        codes[:, self.in_features:] = 0
        return codes

    def _nearest_levels(self, latent: torch.Tensor) -> torch.Tensor:
        """The nearest levels to ``latent``: their values follow the params, their gradient passes straight
        through to ``latent`` (the choice of level is not differentiable)."""
        levels = self.quantizer.dequantize(self._nearest_codes(latent), self.params.float())
        return levels + (latent - latent.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coef, offset = self._cached_linear_form()
        # The dicts directly: Module.__getattr__ costs ~0.7 µs a name, 10% of a small layer's time. A missing
        # bias is a plain None attribute, never in _parameters.
        return bitplane_linear(x, self._buffers["planes"], coef, offset, self.config.group_size,
                               self._parameters.get("bias"))

    def _cached_linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``linear_form()``, recomputed only when ``params`` changes (in place, by a load, or by a move), so a
        forward allocates nothing but its output. (Kept cheap: at 384x384 the whole layer takes ~10 µs.)"""
        params = self._buffers["params"]
        if torch.compiler.is_compiling() or params.is_inference():
            # Inference tensors (a layer built under torch.inference_mode) keep no version counter: an in-place
            # change could not be seen, so nothing is cached.
            return self._kernel_linear_form()
        cached = self.__dict__.get(LINEAR_FORM_CACHE)
        # a new tensor, an in-place change, or a move (a new address) each invalidate the cache
        if cached is None or cached[0] is not params or cached[1] != params._version or \
                cached[2] != params.data_ptr():
            cached = (params, params._version, params.data_ptr(), self._kernel_linear_form())
            self.__dict__[LINEAR_FORM_CACHE] = cached
        return cached[3]

    def _kernel_linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``linear_form()`` with outputs contiguous: the compiled kernels load a group's coefficients as vectors."""
        coef, offset = self.linear_form()
        return coef.transpose(1, 2).contiguous().transpose(1, 2), offset.T.contiguous().T
