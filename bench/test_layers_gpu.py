"""GPU layer benchmarks: sparse_ofa's Triton/CUDA kernels against dense INT8 (torch._int_mm), fp16 and
bf16 F.linear and torch's 2:4 semi-structured sparse F.linear, all in the same run. Skipped without CUDA.

Two kinds of rows (the report compares rows of the same kind, shape and M only):
    kind="layer-int8"  the integer product alone: int8 activations in, exact int32 out
                       (sparse_ofa backend.int_mm vs torch._int_mm on the dense int8 weight)
    kind="layer"       the whole layer: fp16 activations in, fp16 out (SparseInt8Linear.forward,
                       quantization and fused epilogue included, vs F.linear fp16/bf16 and 2:4 fp16)
Timing: each round replays a CUDA graph holding REPEAT calls and synchronizes, so launch gaps and
Python overhead are left out (all impls alike); `us_per_call` = median round / REPEAT. If a graph
cannot be captured the round runs REPEAT eager calls (extra_info timing="eager").
Weights: 90 % unstructured (magnitude), 90 % block (random 64x64 tiles kept), 50 % 2:4 (magnitude).
Grid: BERT-base shapes, M in {16, 128, 1024, 4096}; SPARSE_OFA_BENCH_FULL=1 adds BERT-large.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FULL = os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1"
REPEAT = int(os.environ.get("SPARSE_OFA_GPU_REPEAT", "50"))
ROUNDS = int(os.environ.get("SPARSE_OFA_GPU_ROUNDS", "15"))
SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (K, N): BERT-base q/k/v/o, intermediate, output
if FULL:
    SHAPES += [(1024, 1024), (1024, 4096), (4096, 1024)]  # BERT-large
M_VALUES = [8, 16, 128, 1024, 4096]
PATTERNS = {"unstructured": 0.9, "block": 0.9, "2:4": 0.5}
DEV = "cuda"


@functools.lru_cache(maxsize=None)
def _weight(k, n, pattern):
    from sparse_ofa import magnitude_mask

    gen = torch.Generator().manual_seed(k * 7 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    if pattern == "block":
        tiles = torch.rand(n // 64, k // 64, generator=gen) < 1 - PATTERNS["block"]
        w = w * tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)
    else:
        w = w * magnitude_mask(w, PATTERNS[pattern], pattern)
    return w.to(DEV)


@functools.lru_cache(maxsize=None)
def _module(k, n, pattern, backend):
    from sparse_ofa import SparseInt8Linear

    linear = torch.nn.Linear(k, n).to(DEV)
    with torch.no_grad():
        linear.weight.copy_(_weight(k, n, pattern))
    return SparseInt8Linear.from_linear(linear, pattern="2:4" if pattern == "2:4" else None,
                                        backend=backend)


def _graph_or_eager(fn):
    fn()  # autotune / build outside any capture
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPEAT):
                fn()

        def replay():
            graph.replay()
            torch.cuda.synchronize()

        return replay, "cuda_graph", graph
    except Exception:  # noqa: BLE001 - some impls cannot be captured; time them eagerly
        torch.cuda.synchronize()

        def eager():
            for _ in range(REPEAT):
                fn()
            torch.cuda.synchronize()

        return eager, "eager", None


def _run(benchmark, fn, *, kind, k, n, m, impl, pattern=None, sparsity=None, weight_bytes=None,
         **extra):
    timed, timing, keep_alive = _graph_or_eager(fn)
    benchmark.group = "layer-gpu"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    per_call = benchmark.stats.stats.median / REPEAT
    info = dict(kind=kind, device="cuda", shape=f"{k}x{n}", m=m, impl=impl, pattern=pattern,
                sparsity=sparsity, timing=timing, repeat=REPEAT, us_per_call=per_call * 1e6,
                tops=2 * m * n * k / per_call / 1e12, gpu=torch.cuda.get_device_name())
    if weight_bytes is not None:
        info.update(weight_bytes=weight_bytes, weight_tb_per_s=weight_bytes / per_call / 1e12)
    info.update(extra)
    benchmark.extra_info.update(info)
    del keep_alive


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_bytes(route, prepared, n, k) -> int:
    """Weight bytes the chosen kernel reads per call (its roofline numerator)."""
    if route == "bitmap":
        return _nbytes(*(prepared[f"bitmap_{key}"] for key in ("bits", "values", "offsets")))
    if route == "block":
        return prepared["block_tile_k"].numel() * 64 * 64
    if route == "sp24":
        return _nbytes(prepared["values"], prepared["meta"])
    return n * k


# ------------------------------------------------------------------------------- integer product
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_int_mm_dense_baseline(benchmark, k, n, m):
    from sparse_ofa.backends.dense import DenseInt8Backend

    dense = DenseInt8Backend()
    prepared = _module(k, n, "unstructured", "dense")._prepared["dense"]
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    _run(benchmark, lambda: dense.int_mm(x_q, prepared), kind="layer-int8", k=k, n=n, m=m,
         impl="int_mm", weight_bytes=n * k)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("pattern,backend", [("unstructured", "triton"), ("block", "triton"),
                                             ("2:4", "triton"), ("2:4", "cuda")])
@pytest.mark.parametrize("k,n", SHAPES)
def test_int_mm_sparse(benchmark, k, n, m, pattern, backend):
    from sparse_ofa import backends

    ok, why = backends.availability(backend)
    if not ok:
        pytest.skip(why)
    module = _module(k, n, pattern, backend)
    be, prepared = module._chain[0], module._prepared[backend]
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    route = be._route(m, prepared) if backend == "triton" else "sp24"
    nbytes = _weight_bytes(route, prepared, n, k)
    _run(benchmark, lambda: be.int_mm(x_q, prepared), kind="layer-int8", k=k, n=n, m=m,
         impl=f"sparse_ofa:{backend}", pattern=pattern, sparsity=PATTERNS[pattern],
         weight_bytes=nbytes, route=route)


# ------------------------------------------------------------------------------- whole layer
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("k,n", SHAPES)
def test_linear_dense_baseline(benchmark, k, n, m, dtype):
    torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    w = _weight(k, n, "unstructured").to(torch_dtype)
    b = torch.zeros(n, device=DEV, dtype=torch_dtype)
    x = torch.randn(m, k, device=DEV, dtype=torch_dtype)
    _run(benchmark, lambda: F.linear(x, w, b), kind="layer", k=k, n=n, m=m, impl=f"{dtype}_linear",
         weight_bytes=2 * n * k)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_linear_semi_structured_baseline(benchmark, k, n, m):
    from torch.sparse import to_sparse_semi_structured

    w = _weight(k, n, "2:4").to(torch.float16)
    try:
        w_sparse = to_sparse_semi_structured(w)
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        b = torch.zeros(n, device=DEV, dtype=torch.float16)
        F.linear(x, w_sparse, b)
    except Exception as exc:  # noqa: BLE001 - not every GPU/torch build has it
        pytest.skip(f"to_sparse_semi_structured unavailable: {exc}")
    _run(benchmark, lambda: F.linear(x, w_sparse, b), kind="layer", k=k, n=n, m=m,
         impl="semi_structured_2:4", pattern="2:4", sparsity=0.5, weight_bytes=n * k + n * k // 8)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("pattern,backend", [("unstructured", "triton"), ("block", "triton"),
                                             ("2:4", "triton"), ("2:4", "cuda"),
                                             ("unstructured", "dense"), ("unstructured", "auto"),
                                             ("block", "auto"), ("2:4", "auto")])
@pytest.mark.parametrize("k,n", SHAPES)
def test_linear_sparse(benchmark, k, n, m, pattern, backend):
    from sparse_ofa import backends

    if backend != "auto":
        ok, why = backends.availability(backend)
        if not ok:
            pytest.skip(why)
    module = _module(k, n, pattern, backend)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    _run(benchmark, lambda: module(x), kind="layer", k=k, n=n, m=m, impl=f"sparse_ofa:{backend}",
         pattern=pattern, sparsity=PATTERNS[pattern], dispatch=module.dispatch(m))


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_linear_unstructured_through_block_kernel(benchmark, k, n, m):
    """The device experiment of bench/NOTES.md: a dense-tiled (90 % unstructured) layer through the
    block kernel with every tile listed (quantize + one GEMM with the fused epilogue: 2 launches)
    instead of the dense route (quantize, torch._int_mm, dequantize: 3). Compare with the
    sparse_ofa:triton unstructured rows of test_linear_sparse."""
    from sparse_ofa import backends

    ok, why = backends.availability("triton")
    if not ok:
        pytest.skip(why)
    module = _module(k, n, "unstructured", "triton")
    be = module._chain[0]
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    saved = be.max_tile_density
    be.max_tile_density = 1.0
    try:
        route = be._route(m, module._prepared["triton"])
        _run(benchmark, lambda: module(x), kind="layer", k=k, n=n, m=m, impl="sparse_ofa:triton:all-tiles",
             pattern="unstructured", sparsity=PATTERNS["unstructured"], dispatch=route)
    finally:
        be.max_tile_density = saved
