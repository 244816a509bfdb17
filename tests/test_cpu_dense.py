"""The dense INT8 fallback on the CPU as one op (torch.ops.sparse_ofa.cpu_dense_linear, csrc/cpu_dense.cpp):
bit-exact against the reference numerics (quant.py: quantize, exact int32 product, epilogue) on the
portable and the AVX-512 path, any shape, dynamic and static activations, int8 extremes, non-finite
rows, 1-2 threads; its post-ops bit-identical to the sparse fused linear's; the dense backend and
direct() using it; clear errors. No timings (bench/: test_layers_cpu.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ofa.formats import pack, unpack_int8
from sparse_ofa.modules import SparseInt8Linear
from sparse_ofa.quant import ActQuant, dequantize, quantize_activations

from conftest import cpu_kernel_paths, threads

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()  # every ISA path this CPU runs


def weight(n: int, k: int, seed: int, sparsity: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) >= sparsity)
    packed = pack(w, "unstructured")
    return packed, unpack_int8(packed).t(), torch.randn(n, generator=g)


def dense(x, w_t, scale, bias, act, isa, out_dtype=torch.float32, **post):
    return torch.ops.sparse_ofa.cpu_dense_linear(x, w_t, scale, bias, *act.kernel_args(), out_dtype, isa,
                                                 post.get("residual"), post.get("gelu", False),
                                                 post.get("ln_weight"), post.get("ln_bias"),
                                                 post.get("ln_eps", 1e-12))


def reference(x, w_t, scale, bias, act, out_dtype=torch.float32):
    x_q, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]).float(), act)
    acc = (x_q.double() @ w_t.double()).to(torch.int32)  # exact: see backends/reference.py
    return dequantize(acc, x_scale, scale, bias, out_dtype).view(*x.shape[:-1], w_t.shape[1])


ACTS = [ActQuant(), ActQuant(0.05), ActQuant(0.02, zero_point=-128 + 77, qmin=-128, qmax=127)]


@given(m=st.integers(1, 150), n=st.integers(1, 90), k=st.integers(1, 80), seed=st.integers(0, 999),
       act=st.sampled_from(ACTS), has_bias=st.booleans(), sparsity=st.sampled_from([0.0, 0.5, 1.0]),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(PATHS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_matches_reference_bit_for_bit(m, n, k, seed, act, has_bias, sparsity, out_dtype, nthreads, isa):
    packed, w_t, bias = weight(n, k, seed, sparsity)
    bias = bias if has_bias else None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    with threads(nthreads):
        got = dense(x, w_t, packed.scale, bias, act, isa, out_dtype)
    want = reference(x, w_t, packed.scale, bias, act, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)


def check_extremes_and_special_rows(linear, isa):
    """linear(x, w_t, scale, bias, act, isa) on +-127 weights and huge / zero / NaN / tiny rows:
    the reference's bits, the NaN confined to its own row, a zero row giving the bias."""
    k, n = 67, 33
    w = torch.where(torch.rand(n, k) < 0.5, torch.tensor(-1.0), torch.tensor(1.0))
    packed = pack(w, "unstructured")  # every weight at +-127 after per-channel scaling
    w_t = unpack_int8(packed).t()
    assert w_t.abs().max() == 127
    x = torch.randn(6, k)
    x[0] = 1e30                 # huge but finite: quantizes to +127 everywhere
    x[1] = 0.0                  # zero row: scale 0, output = bias
    x[2, 5] = float("nan")      # non-finite token: its whole row non-finite, the others untouched
    x[3, :] = -1e-30
    bias = torch.randn(n)
    for act in ACTS[:2]:
        got = linear(x, w_t, packed.scale, bias, act, isa)
        want = reference(x, w_t, packed.scale, bias, act)
        assert torch.equal(got[[0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]])
        assert not torch.isfinite(got[2]).any() and not torch.isfinite(want[2]).any()
    assert torch.equal(linear(x, w_t, packed.scale, bias, ACTS[0], isa)[1], bias)


@pytest.mark.parametrize("isa", PATHS)
def test_int8_extremes_and_special_rows(isa):
    check_extremes_and_special_rows(dense, isa)


@pytest.mark.parametrize("isa", PATHS)
def test_post_ops_equal_the_sparse_fused_linear(isa):
    """Same epilogue values, same post-op code (csrc/cpu/postops_*.cpp): bit-identical to cpu_linear."""
    packed, w_t, bias = weight(45, 52, 3, sparsity=0.3)
    args = cpu_backend.CpuBackend._args(cpu_backend.derive_quads(packed))
    x = torch.randn(130, 52)
    r = torch.randn(130, 45)
    ln_w, ln_b = torch.randn(45), torch.randn(45)
    for post in ({}, {"gelu": True}, {"residual": r}, {"residual": r, "gelu": True},
                 {"residual": r, "ln_weight": ln_w, "ln_bias": ln_b, "ln_eps": 1e-5}, {"ln_weight": ln_w}):
        want = torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *ACTS[0].kernel_args(), torch.float32,
                                               isa, post.get("residual"), post.get("gelu", False),
                                               post.get("ln_weight"), post.get("ln_bias"), post.get("ln_eps", 1e-12))
        with threads(2):
            got = dense(x, w_t, packed.scale, bias, ACTS[0], isa, **post)
        assert torch.equal(got, want), sorted(post)


def test_leading_shapes_and_empty():
    packed, w_t, bias = weight(24, 40, 2)
    x = torch.randn(2, 3, 5, 40)
    got = dense(x, w_t, packed.scale, bias, ACTS[0], -1, residual=torch.zeros(2, 3, 5, 24))
    assert got.shape == (2, 3, 5, 24) and torch.equal(got, reference(x, w_t, packed.scale, bias, ACTS[0]))
    assert dense(x[0, 0, 0], w_t, packed.scale, bias, ACTS[0], -1).shape == (24,)
    assert dense(torch.randn(0, 40), w_t, packed.scale, bias, ACTS[0], -1).shape == (0, 24)
    strided = torch.randn(9, 80)[:, ::2]  # non-contiguous input
    assert torch.equal(dense(strided, w_t, packed.scale, bias, ACTS[0], -1),
                       reference(strided, w_t, packed.scale, bias, ACTS[0]))


def test_bad_input_is_named():
    packed, w_t, bias = weight(8, 16, 1)
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="w_t must be int8 \\[K, N\\]"):
        dense(x, w_t.float(), packed.scale, bias, ACTS[0], -1)
    with pytest.raises(RuntimeError, match="x has 15 input features, the weight has 16"):
        dense(torch.randn(4, 15), w_t, packed.scale, bias, ACTS[0], -1)
    with pytest.raises(RuntimeError, match="w_scale must have shape \\(8\\)"):
        dense(x, w_t, packed.scale[:7], bias, ACTS[0], -1)
    with pytest.raises(RuntimeError, match="x must be float32/bfloat16/float16"):
        dense(x.double(), w_t, packed.scale, bias, ACTS[0], -1)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        dense(x, w_t, packed.scale, bias, ACTS[0], -1, residual=torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="post-ops need out_dtype float32"):
        dense(x, w_t, packed.scale, bias, ACTS[0], -1, torch.bfloat16, gelu=True)


def test_dense_backend_module_and_direct():
    """SparseInt8Linear(backend="dense") runs the op: forward equal to the reference backend, direct()
    with post-ops equal to the same post-ops composed from torch ops within float rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) >= 0.5)
    mod = SparseInt8Linear.from_linear(lin, backend="dense")
    ref = SparseInt8Linear.from_linear(lin, backend="reference")
    x = torch.randn(3, 70, 48)
    assert torch.equal(mod(x), ref(x))
    r = torch.randn(3, 70, 40)
    norm = (torch.randn(40), torch.randn(40), 1e-12)
    got = mod.direct(x, residual=r, gelu=True, norm=norm)
    want = torch.layer_norm(torch.nn.functional.gelu(ref(x) + r), (40,), *norm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_input_feature():
    """torch's CPU _int_mm (2.13) returns garbage for K = 1 and N >= 2: the op and the backend's
    int_mm compute that outer product themselves."""
    from sparse_ofa.backends.dense import DenseInt8Backend

    packed, w_t, bias = weight(5, 1, 4, sparsity=0.0)
    x = torch.randn(7, 1)
    assert torch.equal(dense(x, w_t, packed.scale, bias, ACTS[0], -1), reference(x, w_t, packed.scale, bias, ACTS[0]))
    x_q = torch.randint(-127, 128, (7, 1), dtype=torch.int8)
    got = DenseInt8Backend().int_mm(x_q, {"w_t": w_t})
    assert torch.equal(got, (x_q.double() @ w_t.double()).to(torch.int32))


# ---- the panel route (cpu_dense_panel_linear / cpu_dense_panel_int_mm, csrc/cpu/dense_gemm.h) -------
# Its kernels: the portable loop (0) and AVX2 (1, also what AVX-512 CPUs run when the route is forced).
PANEL_PATHS = [0] + ([1] if cpu_backend is not None and cpu_backend.best_isa() != "scalar" else [])


def panel_of(w_t):
    from sparse_ofa.backends.cpu.layouts import derive_panel

    p = derive_panel(w_t.t())
    return p["w_panel"], p["w_layout"]


def panel_dense(x, w_t, scale, bias, act, isa, out_dtype=torch.float32, **post):
    w_panel, w_layout = panel_of(w_t)
    return torch.ops.sparse_ofa.cpu_dense_panel_linear(x, w_panel, w_layout, scale, bias, *act.kernel_args(),
                                                       out_dtype, isa, post.get("residual"),
                                                       post.get("gelu", False), post.get("ln_weight"),
                                                       post.get("ln_bias"), post.get("ln_eps", 1e-12))


def poison_heap(elements: int):
    """Fill then free a NaN / 0x7fc00000 block about the size of the next output, so that an op
    that skipped writing an element would most likely return that poison (the allocator reuses it)."""
    block = torch.full((max(elements, 1),), float("nan"))
    del block


@given(m=st.integers(1, 150), n=st.integers(1, 90), k=st.integers(1, 80), seed=st.integers(0, 999),
       act=st.sampled_from(ACTS), has_bias=st.booleans(), sparsity=st.sampled_from([0.0, 0.5, 1.0]),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       nthreads=st.sampled_from([1, 2, 3]), isa=st.sampled_from(PANEL_PATHS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_panel_matches_reference_bit_for_bit(m, n, k, seed, act, has_bias, sparsity, out_dtype, nthreads, isa):
    packed, w_t, bias = weight(n, k, seed, sparsity)
    bias = bias if has_bias else None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    poison_heap(m * n)
    with threads(nthreads):
        got = panel_dense(x, w_t, packed.scale, bias, act, isa, out_dtype)
    want = reference(x, w_t, packed.scale, bias, act, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)


@pytest.mark.parametrize("isa", PANEL_PATHS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 768, 768), (3, 5, 17), (6, 2, 16), (7, 63, 31), (129, 769, 47),
                                   (13, 3072, 20), (130, 96, 33)])
def test_panel_int_mm_exact_odd_shapes_and_extremes(isa, m, k, n):
    g = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    cases = [(torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
              torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)),
             # +-127 everywhere (the largest sums either sign), then -128 (static activations reach it)
             (torch.where(torch.rand(m, k, generator=g) < 0.5, 127, -127).to(torch.int8),
              torch.where(torch.rand(n, k, generator=g) < 0.5, 127, -127).to(torch.int8)),
             (torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8))]
    from sparse_ofa.backends.cpu.layouts import derive_panel

    for x_q, w_q in cases:
        p = derive_panel(w_q)
        want = (x_q.double() @ w_q.double().t()).to(torch.int32)
        for nthreads in (1, 2, 3):
            poison_heap(m * n)
            with threads(nthreads):
                got = torch.ops.sparse_ofa.cpu_dense_panel_int_mm(x_q, p["w_panel"], p["w_layout"], isa)
            assert torch.equal(got, want), (nthreads, int((got - want).abs().max()))
        strided = torch.cat([x_q, x_q], 1)[:, ::2]  # column stride 2: copied to contiguous rows
        assert torch.equal(torch.ops.sparse_ofa.cpu_dense_panel_int_mm(strided, p["w_panel"], p["w_layout"], isa),
                           (strided.double() @ w_q.double().t()).to(torch.int32))


@pytest.mark.parametrize("isa", PANEL_PATHS)
def test_panel_extremes_and_special_rows(isa):
    check_extremes_and_special_rows(panel_dense, isa)


@pytest.mark.parametrize("isa", PANEL_PATHS)
def test_panel_post_ops_equal_the_int_mm_route(isa):
    """Same epilogue values, same post-op code: bit-identical to cpu_dense_linear (the _int_mm route)."""
    packed, w_t, bias = weight(45, 52, 3, sparsity=0.3)
    x = torch.randn(130, 52)
    r = torch.randn(130, 45)
    ln_w, ln_b = torch.randn(45), torch.randn(45)
    for post in ({}, {"gelu": True}, {"residual": r}, {"residual": r, "gelu": True},
                 {"residual": r, "ln_weight": ln_w, "ln_bias": ln_b, "ln_eps": 1e-5}, {"ln_weight": ln_w}):
        want = dense(x, w_t, packed.scale, bias, ACTS[0], isa, **post)
        with threads(2):
            got = panel_dense(x, w_t, packed.scale, bias, ACTS[0], isa, **post)
        assert torch.equal(got, want), sorted(post)


def test_panel_bad_input_is_named():
    packed, w_t, bias = weight(8, 16, 1)
    w_panel, w_layout = panel_of(w_t)
    x = torch.randn(4, 16)
    args = (packed.scale, bias, *ACTS[0].kernel_args(), torch.float32)
    op = torch.ops.sparse_ofa.cpu_dense_panel_linear
    with pytest.raises(RuntimeError, match="x has 15 input features, the weight has 16"):
        op(torch.randn(4, 15), w_panel, w_layout, *args)
    with pytest.raises(RuntimeError, match="w_panel must be a contiguous int16 CPU tensor \\[1, 8, 16, 2\\]"):
        op(x, w_panel[:, :7], w_layout, *args)
    with pytest.raises(RuntimeError, match="w_layout must be an int32 CPU tensor"):
        op(x, w_panel, w_layout.long(), *args)
    with pytest.raises(RuntimeError, match="panel version 7"):
        op(x, w_panel, torch.tensor([7, 8, 16], dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="w_scale must have shape \\(8\\)"):
        op(x, w_panel, w_layout, packed.scale[:7], *args[1:])
    with pytest.raises(RuntimeError, match="post-ops need out_dtype float32"):
        op(x, w_panel, w_layout, *args[:-1], torch.bfloat16, -1, None, True)
    with pytest.raises(RuntimeError, match="x_q has 15 input features, the weight has 16"):
        torch.ops.sparse_ofa.cpu_dense_panel_int_mm(torch.zeros(2, 15, dtype=torch.int8), w_panel, w_layout)


@pytest.mark.parametrize("route", ["int_mm", "panel"])
def test_dense_backend_routes(route, monkeypatch):
    """SPARSE_OFA_DENSE_ROUTE picks the route at prepare(); both give the reference backend's output,
    with and without the fused post-ops of direct()."""
    from sparse_ofa.backends.cpu.dispatch import DENSE_ROUTES as ROUTES, dense_route as cpu_route, measure_cpu_route

    monkeypatch.setenv("SPARSE_OFA_DENSE_ROUTE", route)
    torch.manual_seed(1)
    lin = torch.nn.Linear(37, 41)
    mod = SparseInt8Linear.from_linear(lin, backend="dense")
    assert ("w_panel" in mod._prepared["dense"]) == (route == "panel")
    ref = SparseInt8Linear.from_linear(lin, backend="reference")
    x = torch.randn(2, 65, 37)
    assert torch.equal(mod(x), ref(x))
    r = torch.randn(2, 65, 41)
    torch.testing.assert_close(mod.direct(x, residual=r, gelu=True), torch.nn.functional.gelu(ref(x) + r),
                               rtol=1e-5, atol=1e-5)
    x_q = torch.randint(-127, 128, (9, 37), dtype=torch.int8)
    assert torch.equal(mod._chain[0].int_mm(x_q, mod._prepared["dense"]),
                       (x_q.double() @ unpack_int8(mod.packed).double().t()).to(torch.int32))
    monkeypatch.delenv("SPARSE_OFA_DENSE_ROUTE")
    assert cpu_route() in ROUTES
    assert set(measure_cpu_route(8, 16, 16)) == set(ROUTES)
    monkeypatch.setenv("SPARSE_OFA_DENSE_ROUTE", "fast")
    with pytest.raises(ValueError, match="SPARSE_OFA_DENSE_ROUTE='fast'"):
        cpu_route()


def test_route_calibration_skips_an_inexact_int_mm(monkeypatch):
    """A torch._int_mm that gets the product wrong (as oneDNN held to AVX2 on an AVX-512 CPU did) is not
    a route; the exact panel GEMM is kept. Neither exact: an error naming both."""
    from sparse_ofa.backends.cpu.dispatch import measure_cpu_route

    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b) + 1)
    assert set(measure_cpu_route(8, 16, 16)) == {"panel"}
    monkeypatch.setattr(torch.ops.sparse_ofa, "cpu_dense_panel_int_mm", lambda x, w, l: real(x, x.new_zeros(16, 16)))
    with pytest.raises(RuntimeError, match="neither torch._int_mm nor the panel GEMM is exact"):
        measure_cpu_route(8, 16, 16)
