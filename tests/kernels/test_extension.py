"""Without a compiler the layers fall back to torch, with one warning that says how to get the fast path."""
import warnings

import torch

import reparam.kernels.extension as extension
from reparam.kernels.bitplane import bitplane_linear, bitplane_reference


def test_failed_build_warns_once_and_falls_back_to_torch(monkeypatch, random_layer):
    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(extension, "_LOADED", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    planes, coef, offset, b = random_layer(40, 64, 3, 32)
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [bitplane_linear(x, planes, coef, offset, 32, b) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["reparam: the compiled CPU kernels are unavailable (Ninja is required to load C++ "
                        "extensions); compressed layers run their slower torch path. To get the fast path, "
                        "install a C++ compiler and ninja (e.g. `apt install g++` and `pip install ninja`), "
                        "then restart Python."]
    for result in results:
        torch.testing.assert_close(result, bitplane_reference(x, planes, coef, offset, 32, b), rtol=1e-5, atol=1e-5)
