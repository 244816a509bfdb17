"""Per-layer CPU benchmarks: the C++ sparse-INT8 kernels against dense INT8 and fp32, same run.

Rows (docs/bench.md convention, group "layer-cpu"):
    sparse_ofa:cpu          SparseInt8Linear(backend="cpu") forward: quantize + sparse product + epilogue
    sparse_ofa:cpu:int_mm   the sparse product alone (int8 in, int32 out): compare with int_mm
    sparse_ofa:auto         backend="auto" (sparse where it wins, dense INT8 elsewhere)
    sparse_ofa:dense        SparseInt8Linear(backend="dense"): quantize + torch._int_mm + epilogue
    int_mm                  torch._int_mm on int8 activations (no quantization, int32 out)
    quantize_dynamic        torch.ao dynamic INT8 Linear (quantizes activations, like ours)
    fp32_linear             F.linear in fp32
Short grid by default (M = 128, BERT-base shapes, 90 % 1x4 / 90 % / 80 % unstructured);
SPARSE_OFA_BENCH_FULL=1 adds M in {1, 16, 1024}, sparsity {0.5, 0.8, 0.9, 0.95} x {unstructured, 1x4}
and the BERT-large shapes.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparse_ofa import SparseInt8Linear, magnitude_mask
from sparse_ofa.backends import availability
from sparse_ofa.quant import quantize_per_token

FULL = os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1"
THREADS = int(os.environ.get("SPARSE_OFA_BENCH_THREADS", "2"))
SHAPES = [(768, 768), (768, 3072), (3072, 768)] + ([(1024, 1024), (1024, 4096), (4096, 1024)] if FULL else [])
MS = [1, 16, 128, 1024] if FULL else [128]
CASES = ([(s, p) for s in (0.5, 0.8, 0.9, 0.95) for p in ("unstructured", "1x4")] if FULL
         else [(0.9, "1x4"), (0.9, "unstructured"), (0.8, "unstructured")])

pytestmark = pytest.mark.skipif(not availability("cpu")[0], reason="cpu backend unavailable")


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _info(benchmark, k, n, m, sparsity, pattern, impl):
    benchmark.group = f"layer-cpu-{k}x{n}-m{m}"
    benchmark.extra_info.update(kind="layer", device="cpu", shape=f"{k}x{n}", m=m, sparsity=sparsity,
                                pattern=pattern, impl=impl, threads=torch.get_num_threads())


def _layer(k, n, sparsity, pattern):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, sparsity, pattern))
    return lin


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("impl", ["sparse_ofa:cpu", "sparse_ofa:cpu:int_mm", "sparse_ofa:auto",
                                  "sparse_ofa:dense"])
@pytest.mark.parametrize("sparsity,pattern", CASES)
def test_sparse_layer(benchmark, k, n, m, sparsity, pattern, impl):
    lin = _layer(k, n, sparsity, pattern)
    x = torch.randn(m, k)
    _info(benchmark, k, n, m, sparsity, pattern, impl)
    if impl == "sparse_ofa:cpu:int_mm":
        from sparse_ofa.backends import get_backend

        backend = get_backend("cpu")
        module = SparseInt8Linear.from_linear(lin, pattern=pattern, backend="cpu")
        prepared = module._prepared["cpu"]
        x_q, _ = quantize_per_token(x)
        benchmark(backend.int_mm, x_q, prepared)
        return
    backend = impl.split(":")[1]
    module = SparseInt8Linear.from_linear(lin, pattern=pattern, backend=backend)
    benchmark.extra_info["dispatch"] = module.dispatch(m)
    with torch.inference_mode():
        benchmark(module, x)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("impl", ["int_mm", "quantize_dynamic", "fp32_linear"])
def test_dense_baseline(benchmark, k, n, m, impl):
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    _info(benchmark, k, n, m, 0.0, "dense", impl)
    with torch.inference_mode():
        if impl == "int_mm":
            x_q, _ = quantize_per_token(x)
            w_t = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()  # as the dense backend holds it
            benchmark(torch._int_mm, x_q, w_t)
        elif impl == "quantize_dynamic":
            qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                          dtype=torch.qint8)
            benchmark(qlin, x)
        else:
            benchmark(F.linear, x, lin.weight, lin.bias)
