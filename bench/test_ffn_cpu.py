"""The feed-forward block of a BERT-base layer on CPU, LayerNorm(W2 GELU(W1 x + b1) + b2 + x), as the
fast path runs it, against the same block in torch, same run.

Rows (docs/bench.md convention, kind "ffn", shape "768x3072x768", group "ffn-cpu-m128"):
    sparse_ofa:cpu              sparse_ofa.fastpath.feed_forward: one cpu_ffn op (intermediate kept
                                channel-major in each thread's cache)
    sparse_ofa:cpu:two_linears  the same block as two fused linears (GELU, add + LayerNorm as post-ops)
    quantize_dynamic            torch.ao dynamic INT8 linears + torch GELU, add, LayerNorm
    fp32_block                  the block in fp32 torch ops
M = 128 tokens; 90 % 1x4 and 90 % unstructured (SPARSE_OFA_BENCH_FULL=1 adds M = 512 and 80 %).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparse_ofa import SparseInt8Linear, magnitude_mask
from sparse_ofa.backends import availability
from sparse_ofa.fastpath.ffn import feed_forward

FULL = os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1"
MS = [128, 512] if FULL else [128]
CASES = [(0.9, "1x4"), (0.9, "unstructured")] + ([(0.8, "unstructured")] if FULL else [])
HIDDEN, INNER = 768, 3072

pytestmark = pytest.mark.skipif(not availability("cpu")[0], reason="cpu backend unavailable")

# threads: bench/conftest.py sets $SPARSE_OFA_BENCH_THREADS (default 2) for the whole session


def _block(sparsity: float, pattern: str):
    """(W1, W2, LayerNorm) with BERT-like init (std 0.02), W1/W2 magnitude-pruned."""
    torch.manual_seed(0)
    lin1, lin2, norm = torch.nn.Linear(HIDDEN, INNER), torch.nn.Linear(INNER, HIDDEN), torch.nn.LayerNorm(HIDDEN)
    with torch.no_grad():
        for lin in (lin1, lin2):
            lin.weight.normal_(0, 0.02)
            lin.weight.mul_(magnitude_mask(lin.weight, sparsity, pattern))
    return lin1, lin2, norm


def _info(benchmark, m, sparsity, pattern, impl):
    benchmark.group = f"ffn-cpu-m{m}"
    benchmark.extra_info.update(kind="ffn", device="cpu", shape=f"{HIDDEN}x{INNER}x{HIDDEN}", m=m,
                                sparsity=sparsity, pattern=pattern, impl=impl, threads=torch.get_num_threads())


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", ["sparse_ofa:cpu", "sparse_ofa:cpu:two_linears"])
@pytest.mark.parametrize("sparsity,pattern", CASES)
def test_sparse_ffn(benchmark, m, sparsity, pattern, impl):
    lin1, lin2, norm = _block(sparsity, pattern)
    first = SparseInt8Linear.from_linear(lin1, pattern=pattern, backend="cpu")
    second = SparseInt8Linear.from_linear(lin2, pattern=pattern, backend="cpu")
    x = torch.randn(1, m, HIDDEN)
    ln = (norm.weight.detach(), norm.bias.detach(), norm.eps)
    _info(benchmark, m, sparsity, pattern, impl)
    with torch.inference_mode():
        if impl == "sparse_ofa:cpu":
            benchmark(feed_forward, first, second, x, residual=x, norm=ln)
        else:
            benchmark(lambda: second.direct(first.direct(x, gelu=True), residual=x, norm=ln))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", ["quantize_dynamic", "fp32_block"])
def test_dense_ffn_baseline(benchmark, m, impl):
    lin1, lin2, norm = _block(0.0, "unstructured")
    x = torch.randn(1, m, HIDDEN)
    if impl == "quantize_dynamic":
        lin1, lin2 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin1, lin2), {torch.nn.Linear},
                                                            dtype=torch.qint8)
    _info(benchmark, m, 0.0, "dense", impl)
    with torch.inference_mode():
        benchmark(lambda: norm(lin2(F.gelu(lin1(x))) + x))
