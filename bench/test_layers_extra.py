"""Per-layer CPU rows the issue's grid asks for that bench/test_layers_cpu.py does not time: the 2:4
pattern (exactly 50 % sparse) on every CPU backend that runs it. Its dense baselines (int_mm,
quantize_dynamic, fp32_linear) come from bench/test_layers_cpu.py in the same run: same kind,
device, shape and M, so the speedup table pairs them.
"""
from __future__ import annotations

import os

import pytest
import torch

from sparse_ofa import SparseInt8Linear, magnitude_mask
from sparse_ofa.backends import get_backend, list_backends

FULL = os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1"
SHAPES = [(768, 768), (768, 3072), (3072, 768)] + ([(1024, 1024), (1024, 4096), (4096, 1024)] if FULL else [])
MS = [1, 16, 128, 1024] if FULL else [128]


def _cpu_backends_for_2_4() -> list[str]:
    names = []
    for name, ok, _ in list_backends():
        if ok and name != "reference" and "cpu" in get_backend(name).device_types:
            names.append(name)
    return names + ["auto"]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("backend", _cpu_backends_for_2_4())
def test_2_4_layer(benchmark, k, n, m, backend):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, 0.5, "2:4"))
    try:
        module = SparseInt8Linear.from_linear(lin, pattern="2:4", backend=backend)
    except ValueError as exc:  # this backend does not run 2:4 weights on CPU
        pytest.skip(str(exc))
    x = torch.randn(m, k)
    benchmark.group = f"layer-cpu-{k}x{n}-m{m}"
    benchmark.extra_info.update(kind="layer", device="cpu", shape=f"{k}x{n}", m=m, sparsity=0.5,
                                pattern="2:4", impl=f"sparse_ofa:{backend}",
                                dispatch=module.dispatch(m), threads=torch.get_num_threads())
    with torch.inference_mode():
        benchmark(module, x)
