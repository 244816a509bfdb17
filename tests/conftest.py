import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sparse_weight(n: int, k: int, sparsity: float, pattern: str = "unstructured", generator=None):
    """A random float weight pruned by magnitude to `sparsity` in `pattern`."""
    from sparse_ofa import magnitude_mask

    w = torch.randn(n, k, generator=generator)
    if sparsity > 0:
        w = w * magnitude_mask(w, sparsity, pattern)
    return w
