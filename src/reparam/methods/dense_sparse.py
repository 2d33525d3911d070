"""Dense-sparse factorization (DSFormer, Chand et al. 2023): W ≈ D·S.

D (out, k) is a dense dictionary of k atoms; S (k, in) has exactly s nonzeros
in every column, so each input channel's column of W lives in its own
s-dimensional subspace spanned by s atoms (a union of subspaces, more
expressive per byte than one rank-k basis).

The fit alternates two exact-or-greedy steps from the truncated SVD:

- codes: for every column, the support is the s atoms with the largest
  contribution |z_a|·‖d_a‖ in the dense least-squares code z = D⁺w, and the
  values are least squares on that support. With calibration data the
  columns are coded one by one with GPTQ's error compensation
  (``core.compensation``, optionally in activation order), so the codes
  minimize the output error;
- dictionary: D = W G Sᵀ (S G Sᵀ)⁻¹, the exact minimizer of ‖(W − DS)L‖_F
  for fixed S (G = LLᵀ the calibration Gram; G = I without data).

Straight-Through Factorizer (STF) training: in ``train()`` mode the module
holds a dense shadow S̃; the forward uses the top-s entries of each column
of S̃ and the backward passes gradients to all of S̃, so the sparsity
pattern can move. ``eval()`` packs S̃ back into values and indices.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.compensation import Compensation
from ..core.config import ConfigError, MethodConfig, check_budget, check_choice, check_flag
from ..core.factorizer import Factorizer, Identity, TruncatedSVD, Whitening, factor_budget
from ..core.linalg import ridged_solve
from ..core.module import ReparamModule
from ..core.registry import register_wrapper
from ..core.stats import LayerStats
from ..kernels.dense_sparse import dense_sparse_linear, sparse_to_dense
from ..kernels.factor_chain import factor_chain_linear
from ..kernels.sparse_code import compensated_codes, sparse_code_column_reference

FACTORIZERS = ("auto", "plain", "whitened")
PATTERNS = (None, "2:4")
# Nonzeros per column as a fraction of the atoms when size_ratio sets the
# shape: the best split measured on all three of MiniLM's layer shapes fell
# at s/k ≈ 0.3–0.5 (docs/dense_sparse.md).
DENSITY = 0.4
# Code/dictionary alternations. The calibration objective still falls after 10, but
# SmolLM2's held-out perplexity at size_ratio 0.8 was 26.11-26.17 after 4, 24.77-25.34
# after 6 and 25.06 after 8 (docs/dense_sparse.md): no gain beyond 6 that shows above
# the spread between runs.
ROUNDS = 6
DENSE_S_CACHE = "_dense_sparse_cache_entry"  # S made dense for the CPU inference path (``_dense_sparse_cache``)


@dataclasses.dataclass(frozen=True)
class DenseSparseConfig(MethodConfig):
    """Set ``size_ratio`` or both ``atoms`` (k) and ``nnz`` (s).

    ``factorizer="auto"`` is ``whitened`` (output-error fit) when ``convert``
    gets calibration data and ``plain`` (weight-error fit) when it does not.
    ``pattern="2:4"``: in every column, at most 2 nonzeros in each run of 4
    atoms (nnz = atoms/2), the N:M layout sparse tensor cores run.
    ``act_order``: the whitened fit codes columns in GPTQ's activation order.
    """

    method: ClassVar[str] = "dense_sparse"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "size_ratio": "fraction of the dense layer's bytes kept (sets atoms and nnz); or give both of those",
        "atoms": "k, the dictionary's atoms (columns of D)",
        "nnz": "s, nonzeros per column of S (atoms each input channel uses)",
        "factorizer": '"auto", "plain" (weight error) or "whitened" (output error on calibration data)',
        "pattern": 'None, or "2:4": at most 2 nonzeros in every 4 atoms (N:M sparse tensor cores)',
        "act_order": "code columns in GPTQ's activation order in the whitened fit",
    }
    size_ratio: float | None = None
    atoms: int | None = None
    nnz: int | None = None
    factorizer: str = "auto"
    pattern: str | None = None
    act_order: bool = False  # no net gain on MiniLM: −0.007 at size_ratio 0.25, +0.003 at 0.5 (docs/dense_sparse.md)

    def __post_init__(self):
        check_budget(self.method, self.size_ratio, {"atoms": self.atoms, "nnz": self.nnz})
        if self.size_ratio is None and (self.atoms is None or self.nnz is None):
            raise ConfigError(f"{self.method}: set both atoms and nnz, or size_ratio")
        check_choice(self.method, "factorizer", self.factorizer, FACTORIZERS)
        check_choice(self.method, "pattern", self.pattern, PATTERNS)
        check_flag(self.method, "act_order", self.act_order)
        if self.atoms is not None:
            if self.nnz > self.atoms:
                raise ConfigError(f"{self.method}: nnz={self.nnz} exceeds atoms={self.atoms}; "
                                  "a column cannot use more atoms than the dictionary has")
            if self.pattern == "2:4" and (self.atoms % 4 or self.nnz != self.atoms // 2):
                raise ConfigError(f"{self.method}: pattern '2:4' needs atoms divisible by 4 and nnz = atoms/2, "
                                  f"got atoms={self.atoms}, nnz={self.nnz}")

    def requires_calibration(self) -> bool:
        return self.factorizer == "whitened"

    def uses_calibration(self) -> bool:
        return self.factorizer != "plain"

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        if self.pattern == "2:4" and min(in_features, out_features) < 4:
            raise ConfigError(f"{self.method}: pattern '2:4' needs at least 4 atoms, but layer '{name}' is "
                              f"{out_features}x{in_features} (atoms ≤ min(in, out) = "
                              f"{min(in_features, out_features)}); drop the pattern for this layer or exclude it")
        if self.atoms is not None and self.atoms > min(in_features, out_features):
            raise ConfigError(f"{self.method}: atoms={self.atoms} exceeds min(in, out)="
                              f"{min(in_features, out_features)} of layer '{name}'; lower atoms or use size_ratio")

    def shape_for(self, in_features: int, out_features: int, bias: bool, element_size: int) -> tuple[int, int]:
        """(atoms, nnz) for a layer; with ``size_ratio``, the largest that fit its bytes."""
        if self.atoms is not None:
            return self.atoms, self.nnz
        budget = factor_budget(self.size_ratio, in_features, out_features, bias)  # in weight elements
        if self.pattern == "2:4":
            atoms = 4 * max(1, min(in_features, out_features) // 4)
            while atoms > 4 and _elements(atoms, atoms // 2, in_features, out_features, element_size) > budget:
                atoms -= 4
            return atoms, atoms // 2
        atoms = min(in_features, out_features)
        while atoms > 1 and _elements(atoms, max(1, round(DENSITY * atoms)), in_features, out_features,
                                      element_size) > budget:
            atoms -= 1
        return atoms, max(1, round(DENSITY * atoms))


def index_dtype(atoms: int) -> torch.dtype:
    """The smallest integer type that holds an atom index."""
    return torch.uint8 if atoms <= 256 else torch.int16 if atoms <= 32768 else torch.int32


def _elements(atoms: int, nnz: int, in_features: int, out_features: int, element_size: int) -> float:
    return atoms * out_features + nnz * in_features * (1 + index_dtype(atoms).itemsize / element_size)


class SparseDictionary(Factorizer):
    """Fits D (out, k) and column-sparse S, returned as (D, values (s, in), indices (s, in))."""

    def __init__(self, atoms: int, nnz: int, pattern: str | None, whitened: bool, act_order: bool = False):
        self.atoms, self.nnz, self.pattern, self.whitened, self.act_order = atoms, nnz, pattern, whitened, act_order

    def factorize(self, weight: torch.Tensor, stats: LayerStats | None):
        gram = stats.gram.to(torch.float64) if self.whitened else None
        # The whitening's (in, in) factor serves the start only: not held through the rounds.
        start = TruncatedSVD(self.atoms, Whitening(gram) if self.whitened else Identity())
        dictionary, _ = start.factorize(weight, stats)
        del start
        compensation = Compensation(gram, act_order=self.act_order) if self.whitened else None
        best, best_error = None, float("inf")
        for round_ in range(ROUNDS + 1):
            if best is not None:
                dictionary = self.dictionary(weight, sparse_to_dense(*best[1:], self.atoms), gram)
            values, indices = self.codes(weight, dictionary, compensation)
            # The code step is greedy, so a round can lose: keep the best iterate.
            error = _error(weight, dictionary @ sparse_to_dense(values, indices, self.atoms), gram)
            if error < best_error:
                best, best_error = (dictionary, values, indices), error
            elif round_:
                break  # the dictionary step starts from the best codes: nothing new would follow
        return best

    def codes(self, weight, dictionary, compensation):
        """Sparse codes of every column: (values (s, in), indices (s, in) int64, ascending).

        A column's code needs only Dᵀw, and compensation acts on each row of
        W alike, so it runs on Dᵀ·W (k, in) with the columns' approximations
        Dᵀ·D·s: k rows instead of out.
        """
        coder = _Coder(dictionary, self.nnz, self.pattern)
        projected = dictionary.T @ weight  # (k, in)
        if compensation is None:
            values, indices = coder(projected)
        else:
            values, indices = compensated_codes(projected, compensation, coder)
        indices, position = indices.sort(0)
        return values.gather(0, position), indices

    @staticmethod
    def dictionary(weight, sparse, gram):
        """argmin_D ‖(W − D·S)L‖_F = W G Sᵀ (S G Sᵀ)⁻¹ (G = I when ``gram`` is None)."""
        sg = sparse if gram is None else sparse @ gram
        return ridged_solve(sg @ sparse.T, (weight @ sg.T).T).T  # the ridge: atoms no column uses


def _error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """‖(W − Ŵ)L‖²_F = tr(E G Eᵀ), or ‖W − Ŵ‖²_F without a Gram."""
    delta = weight - approx
    return float((delta.square() if gram is None else (delta @ gram) * delta).sum())


class _Coder:
    """Support by contribution in the dense code, values by least squares on
    it; from a column's projection y = Dᵀw alone."""

    def __init__(self, dictionary: torch.Tensor, nnz: int, pattern: str | None):
        self.atoms, self.nnz, self.pattern = dictionary.shape[1], nnz, pattern
        self.gram = dictionary.T @ dictionary  # (k, k) DᵀD
        # The dense code z = D⁺w = (DᵀD)⁺Dᵀw = (DᵀD)⁺·y, its rows scaled by the atoms'
        # norms: |z_a|·‖d_a‖ is atom a's contribution. The pseudo-inverse of the (k, k)
        # Gram (an eigendecomposition) equals D⁺D⁺ᵀ and costs a quarter of D's SVD.
        self.contribution = torch.linalg.pinv(self.gram, hermitian=True) * dictionary.norm(dim=0)[:, None]  # (k, k)
        # A tiny ridge keeps every support's solve defined (e.g. two equal atoms).
        self.system = self.gram.clone()
        self.system.diagonal().add_(1e-12 * self.gram.diagonal().mean().clamp_min(1e-30))

    def __call__(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (s, n), indices (s, n)) of columns given as y = Dᵀw (k, n); indices in no particular order."""
        scores = (self.contribution @ projected).abs()  # (k, n)
        if self.pattern == "2:4":
            runs = scores.view(-1, 4, scores.shape[1])
            indices = (runs.topk(2, dim=1).indices + 4 * torch.arange(runs.shape[0])[:, None, None]).flatten(0, 1)
        else:
            indices = scores.topk(self.nnz, dim=0).indices  # (s, n)
        sub = self.system[indices.T[:, :, None], indices.T[:, None, :]]  # (n, s, s)
        rhs = projected.gather(0, indices).T  # (n, s)
        return torch.linalg.solve(sub, rhs).T, indices

    def column(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values (s,), indices (s,), DᵀD·s (k,)) of one column given as y = Dᵀw (k,)."""
        if self.pattern is None:
            return sparse_code_column_reference(y, self.contribution, self.system, self.gram, self.nnz)
        values, indices = self(y[:, None])
        return values[:, 0], indices[:, 0], values[:, 0] @ self.gram.index_select(0, indices[:, 0])


class _TopS(torch.autograd.Function):
    """Forward: keep the top-s magnitudes of each column; backward: straight through."""

    @staticmethod
    def forward(ctx, shadow: torch.Tensor, nnz: int, pattern: str | None):
        return shadow * top_mask(shadow, nnz, pattern)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def top_mask(shadow: torch.Tensor, nnz: int, pattern: str | None) -> torch.Tensor:
    """(k, in) mask of the entries a column keeps."""
    magnitude = shadow.detach().abs()
    if pattern == "2:4":
        runs = magnitude.T.reshape(magnitude.shape[1], -1, 4)
        keep = torch.zeros_like(runs).scatter_(-1, runs.topk(2, dim=-1).indices, 1.0)
        return keep.reshape(magnitude.shape[1], -1).T
    return torch.zeros_like(magnitude).scatter_(0, magnitude.topk(nnz, dim=0).indices, 1.0)


@register_wrapper(DenseSparseConfig)
class DenseSparseLinear(ReparamModule):
    """``nn.Linear`` with W = D·S: ``d`` (out, k), ``values`` and ``indices`` (s, in).

    Fine-tune with STF: in ``train()`` mode S is the dense ``shadow`` (k, in)
    parameter's top-s per column; ``eval()`` packs it into ``values`` and
    ``indices``. The trainable tensors (``d``, ``values``, ``shadow``,
    ``bias``) are the same objects for the module's whole life, so an
    optimizer built at any time keeps updating what the forward uses across
    eval/train cycles: ``shadow`` exists from the start, empty until the
    first ``train()`` fills it (its data is set in place, the Parameter
    kept). In training, ``values`` is frozen (the shadow carries S).
    ``state_dict`` always holds the packed form, in either mode.
    """

    CACHES = (DENSE_S_CACHE,)
    TUNABLE = ("d", "values")

    def __init__(self, in_features: int, out_features: int, bias: bool, config: DenseSparseConfig, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        self.atoms, self.nnz = config.shape_for(in_features, out_features, bias, element_size)
        self.d = nn.Parameter(torch.empty(out_features, self.atoms, device=device, dtype=self.dtype))
        self.values = nn.Parameter(torch.empty(self.nnz, in_features, device=device, dtype=self.dtype))
        self.register_buffer("indices", torch.zeros(self.nnz, in_features, device=device,
                                                    dtype=index_dtype(self.atoms)))
        # (k, in) while STF training has started, (0,) before; never saved.
        self.shadow = nn.Parameter(torch.empty(0, device=device, dtype=self.dtype))
        self._packed_version: tuple[int, int] | None = None  # (values, indices) versions the shadow matches
        # values.requires_grad from before train() froze it (the shadow carries S in training); None: not frozen
        self._values_trainable: bool | None = None
        self.training = False  # a converted layer starts packed, like a model in eval()

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        kind = self.config.factorizer
        whitened = kind == "whitened" or (kind == "auto" and stats is not None)
        if whitened and stats is None:
            raise ConfigError("dense_sparse: factorizer 'whitened' needs calibration statistics; pass calib to convert")
        fitter = SparseDictionary(self.atoms, self.nnz, self.config.pattern, whitened, self.config.act_order)
        d, values, indices = fitter.factorize(weight, stats)
        self.d.copy_(d)
        self.values.copy_(values)
        self.indices.copy_(indices)

    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        indices = state["indices"].long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.atoms):
            raise ValueError(f"indices must lie in [0, {self.atoms}) (the atoms), found "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        if self.nnz > 1 and (indices.sort(0).values.diff(dim=0) == 0).any():
            raise ValueError("an input channel lists the same atom twice in indices")

    def sparse(self) -> torch.Tensor:
        """S as a dense (k, in) matrix: the shadow's top-s in training, else the packed codes."""
        if self.training and self.values.device.type != "meta":  # a meta skeleton has no values to train
            self._unpack()
            return _TopS.apply(self.shadow, self.nnz, self.config.pattern)
        return sparse_to_dense(self.values, self.indices, self.atoms)

    def materialize(self) -> torch.Tensor:
        return self.d @ self.sparse()

    def differentiable_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin products, as the layer runs: D·S costs more than the layer's forward on a few hundred tokens.
        return F.linear(F.linear(x, self.sparse()), self.d, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.differentiable_forward(x)
        # The dicts directly, as QuantizedLinear does: Module.__getattr__ costs ~0.7 µs a name, and the whole
        # layer takes ~5 µs at one token.
        parameters = self._parameters
        if x.is_cpu and not (torch.is_grad_enabled() and parameters["values"].requires_grad):
            # Inference on CPU: two GEMMs with S kept dense (k·in more floats in memory, built once per packed
            # S). Scattering the s·in products costs a read-modify-write each and was slower than the dense
            # layer at most measured shapes (docs/kernels.md); two GEMMs cost k·(in + out) multiply-adds.
            return factor_chain_linear(x, self._dense_sparse_cache(), parameters["d"], parameters.get("bias"))
        return dense_sparse_linear(x, self.d, self.values, self.indices, self.bias)

    def _dense_sparse_cache(self) -> torch.Tensor:
        values, indices = self._parameters["values"], self._buffers["indices"]
        if values.is_inference() or indices.is_inference():  # no version counter to see a change by: no cache
            return sparse_to_dense(values.detach(), indices, self.atoms)
        key = (values.data_ptr(), values._version, indices.data_ptr(), indices._version)
        cached = self.__dict__.get(DENSE_S_CACHE)
        if cached is None or cached[0] != key:
            cached = (key, sparse_to_dense(values.detach(), indices, self.atoms))
            self.__dict__[DENSE_S_CACHE] = cached
        return cached[1]

    def train(self, mode: bool = True):
        if mode and not self.training:
            self._unpack()
            # In training the shadow carries S; ``values`` gets its own flag back in eval.
            self._values_trainable = self.values.requires_grad
            self.values.requires_grad_(False)
        elif not mode and self.training:
            self._pack()
            if self._values_trainable is not None:
                # A layer frozen while training (d frozen too, e.g. model.requires_grad_(False)) stays frozen.
                self.values.requires_grad_(self._values_trainable and self.d.requires_grad)
                self._values_trainable = None
        return super().train(mode)

    def _versions(self) -> tuple[int, int]:
        return self.values._version, self.indices._version

    @torch.no_grad()
    def _unpack(self) -> None:
        """Fill the shadow from the packed codes, in place, unless it already
        holds them (then its small entries, which let the pattern move, are kept)."""
        if self._shadow_live() and self._packed_version == self._versions():
            return
        dense = sparse_to_dense(self.values.detach(), self.indices, self.atoms)
        if self.shadow.device != dense.device:  # a skeleton filled by assignment (e.g. from_pretrained)
            self.shadow = nn.Parameter(torch.empty(0, device=dense.device, dtype=self.dtype))
        self.shadow.data = dense
        self._packed_version = self._versions()

    def _shadow_live(self) -> bool:
        """Whether the shadow holds S (it stays empty until training needs it)."""
        return self.shadow.shape == (self.atoms, self.in_features)

    @torch.no_grad()
    def _pack(self) -> None:
        if not self._shadow_live() or self.shadow.device.type == "meta":  # the packed codes are S
            return
        kept = top_mask(self.shadow, self.nnz, self.config.pattern)
        indices = kept.T.nonzero()[:, 1].view(self.in_features, self.nnz).T  # ascending atom order
        self.indices.copy_(indices)
        self.values.copy_(self.shadow.gather(0, indices))
        self._packed_version = self._versions()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saved models always hold the packed form, whatever the mode.
        if self.training:
            self._pack()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "shadow", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "shadow" in missing_keys:
            missing_keys.remove(prefix + "shadow")  # never saved: rebuilt from the packed codes
        if self.shadow.device != self.values.device:  # loaded by assignment into a meta skeleton
            self.shadow = nn.Parameter(torch.empty(0, device=self.values.device, dtype=self.dtype))
        self._packed_version = None
        if self.training:
            self._unpack()
