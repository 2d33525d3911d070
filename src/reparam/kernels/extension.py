"""reparam's compiled CPU kernels (``csrc/*.cpp``), built on first use.

``compiled_ops()`` compiles the sources once per machine with
``torch.utils.cpp_extension`` (the C++ compiler and ninja; the build is cached
in torch's extension directory as ``reparam_kernels``, 1–2 minutes the first
time, instant after) and returns ``torch.ops.reparam_cpu``. Where the build is
impossible it returns None after one warning, and layers keep running their
torch paths. ``compiled_entry()`` is the same build's Python module, whose
``bitplane_linear`` is the eager fast path (``csrc/python_entry.cpp``: the
kernels without the op dispatcher's per-call cost when autograd records
nothing).

The ops (CPU tensors; each also has a shape-only "fake" kernel so that
``torch.compile`` and ``torch.export`` trace through them as single nodes,
and a backward in torch, so layers keep training through them):

- ``bitplane_linear(x, planes, coef, offset, group_size, bias)``: one of the two
  below, by the token count and the crossover measured on this machine.
- ``bitplane_lut(x, planes, coef, offset, group_size, bias)``: few tokens (or
  any, on CPUs where it wins).
- ``bitplane_decode_mm(x, planes, coef, offset, group_size, bias)``: many tokens.
- ``lut_crossover(bits) -> tokens``, ``set_lut_crossover(bits, tokens) -> previous``:
  the most tokens ``bitplane_linear`` gives the LUT (measured on first use per
  thread count; a pin overrides it, ``-1`` unpins).
- ``dense_sparse_linear(x, d, values, indices, bias)``: few tokens.
- ``sparse_codes_compensated(...)``: not a forward; dense_sparse's whitened
  code step (``sparse_code.py``), no fake kernel or backward.
- ``set_isa_limit(level) -> previous``, ``cpu_isa()``: the instruction set the
  LUT uses (0 scalar, 1 AVX2, 2 AVX-512); tests cap it to reach every path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

SOURCES = sorted(str(path) for path in (Path(__file__).parent / "csrc").glob("*.cpp"))
HOW_TO_GET_IT = ("install a C++ compiler and ninja (e.g. `apt install g++` and `pip install ninja`), "
                 "then restart Python")

_LOADED: dict[str, object] = {}  # "ops": the namespace, "entry": the module; None once the build failed


def compiled_ops():
    """``torch.ops.reparam_cpu``, or None (warning once) when the kernels cannot be built."""
    if "ops" not in _LOADED:
        _LOADED["entry"] = _build()
        _LOADED["ops"] = None if _LOADED["entry"] is None else torch.ops.reparam_cpu
    return _LOADED["ops"]


def compiled_entry():
    """The compiled Python module (``bitplane_linear``, the eager fast path), or None like ``compiled_ops``."""
    if "ops" not in _LOADED:
        compiled_ops()
    return _LOADED["entry"]


def _build():
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(name="reparam_kernels", sources=SOURCES, is_python_module=True,
                                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (ImportError, OSError, RuntimeError) as error:  # no compiler, no ninja, or a failed build
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"reparam: the compiled CPU kernels are unavailable ({reason}); compressed layers run "
                      f"their slower torch path. To get the fast path, {HOW_TO_GET_IT}.", RuntimeWarning,
                      stacklevel=4)
        return None
    from . import bitplane, dense_sparse  # each kernel file registers its ops' fake and backward

    bitplane.register_compiled_ops()
    dense_sparse.register_compiled_ops()
    return module


def cpu_kernels_for(x: torch.Tensor):
    """The compiled ops when ``x`` is a CPU tensor and they could be built; else None."""
    return compiled_ops() if x.is_cpu else None
