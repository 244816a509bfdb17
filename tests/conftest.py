import contextlib
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


def tiny_pruned_bert(sparsity: float = 0.6, seed: int = 0):
    """A 2-layer BertModel (hidden 64, FFN 128, 4 heads, sdpa, no pooler) in eval mode, every encoder
    Linear magnitude-pruned to `sparsity`."""
    from transformers import BertConfig, BertModel

    from sparse_ofa import magnitude_prune_

    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, attn_implementation="sdpa"), add_pooling_layer=False)
    magnitude_prune_(model.eval(), sparsity)
    return model


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to n inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_kernel_paths():
    """(skip mark without the cpu backend, its module or None, the ISA codes of every kernel path this
    machine runs, ascending, so the last is the best: 0 = portable, 1 = AVX2, 2 = AVX-VNNI, 3 = AVX-512
    VNNI, each where the CPU has it)."""
    from sparse_ofa.backends import availability

    ok, why = availability("cpu")
    mark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
    if not ok:  # pragma: no cover
        return mark, None, [0]
    from sparse_ofa.backends import cpu

    cpu.load()
    return mark, cpu, [code for code in sorted(cpu.ISA_NAMES) if _cpu_runs(code)]


def _cpu_runs(code: int) -> bool:
    """Whether this CPU runs the kernels of ISA code `code` (the ops raise for one it does not)."""
    try:
        torch.ops.sparse_ofa.cpu_quantize(torch.zeros(1, 1), 0.0, 0.0, 0, -127, 127, code)
    except RuntimeError:
        return False
    return True

