import os

# Kernels are proven on CPU: Triton decides at decoration time whether to
# interpret, so this must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    """The real-model harness: 128 calibration and 256 held-out sentences, and
    the original model's held-out embeddings (built once per test session)."""
    from reparam.minilm import Harness

    return Harness.build()
