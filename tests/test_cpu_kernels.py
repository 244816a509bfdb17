"""The C++ CPU kernels (torch.ops.sparse_ofa.cpu_*) against the reference numerics, on every ISA this
machine runs: exact int32 products, identical activation quantization, the fused linear, dispatch,
errors. Outputs are poisoned before each call so that an element the kernel forgets shows up."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ofa.backends import availability
from sparse_ofa.formats import pack, unpack_int8
from sparse_ofa.quant import ActQuant, dequantize, quantize_activations

from conftest import threads

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")

if ok:
    from sparse_ofa.backends import cpu as cpu_backend

    cpu_backend.load()
    ISAS = [code for name, code in cpu_backend.ISAS.items()
            if code <= cpu_backend.ISAS[cpu_backend.best_isa()]]
else:  # pragma: no cover
    ISAS = [0]

POISON_INT = 0x7F7F7F7F
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_weight(n, k, sparsity, pattern, seed, extremes=False):
    """Float weight [n, k] with `sparsity` of its blocks zero; row 0 all zero, row 1 fully dense
    (when n allows). `extremes`: every kept weight is +-1 times its row's max, so it quantizes
    to +-127."""
    g = torch.Generator().manual_seed(seed)
    block = 4 if pattern == "1x4" else 1
    w = torch.randn(n, k, generator=g)
    if extremes:
        w = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
    if pattern == "2:4":
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
        keep.scatter_(-1, idx, True)
        keep &= torch.rand(n, k // 4, 1, generator=g) >= sparsity
        keep = keep.view(n, k)
    else:
        keep = (torch.rand(n, k // block, generator=g) >= sparsity).repeat_interleave(block, 1)
    if n > 0:
        keep[0] = False
    if n > 1:
        keep[1] = pattern != "2:4"
        if pattern == "2:4":
            keep[1] = torch.tensor([True, False, True, False]).repeat(k // 4)
    return w * keep


def int8_acts(m, k, seed, extremes=False):
    g = torch.Generator().manual_seed(seed)
    if extremes:
        return torch.where(torch.rand(m, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    return torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)


def ref_int_mm(x_q, packed):
    return (x_q.to(torch.float64) @ unpack_int8(packed).to(torch.float64).T).to(torch.int32)


def args_of(prepared):
    return cpu_backend.CpuBackend._args(prepared)


def derive(packed, layout):
    if layout == "gathered":
        return cpu_backend.derive_gathered(packed)
    return cpu_backend.derive_quads(packed)


# ------------------------------------------------------------------------------------- int_mm
@SETTINGS
@given(m=st.integers(1, 300), n=st.integers(1, 140), k4=st.integers(1, 50), k_rem=st.integers(0, 3),
       sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.9, 0.97, 1.0]),
       pattern=st.sampled_from(["unstructured", "1x4", "2:4"]), extremes=st.booleans(),
       noncontig=st.booleans(), nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(ISAS),
       layout=st.sampled_from(["quads", "gathered"]), seed=st.integers(0, 2**16))
def test_int_mm_exact(m, n, k4, k_rem, sparsity, pattern, extremes, noncontig, nthreads, isa, layout, seed):
    k = 4 * k4 + (k_rem if pattern == "unstructured" else 0)
    packed = pack(make_weight(n, k, sparsity, pattern, seed, extremes), pattern)
    prepared = derive(packed, layout)
    x_q = int8_acts(m, k, seed + 1, extremes)
    if noncontig:  # rows strided: a column slice of a wider tensor
        wide = int8_acts(m, k + 5, seed + 2)
        wide[:, 3:3 + k] = x_q
        x_q = wide[:, 3:3 + k]
        assert x_q.stride(0) == k + 5
    out = torch.full((m, n), POISON_INT, dtype=torch.int32)
    with threads(nthreads):
        torch.ops.sparse_ofa.cpu_int_mm_out(x_q, *args_of(prepared), out, isa)
    assert torch.equal(out, ref_int_mm(x_q, packed))


def test_int_mm_transposed_input_and_large_k():
    # a transposed view (column stride != 1) and K near the int32 headroom of the u8 offset trick
    k, n, m = 4100, 9, 5
    packed = pack(make_weight(n, k, 0.0, "unstructured", 3, extremes=True), "unstructured")
    x_q = int8_acts(k, m, 4, extremes=True).t()
    for layout in ("quads", "gathered"):
        prepared = derive(packed, layout)
        for isa in ISAS:
            got = torch.ops.sparse_ofa.cpu_int_mm(x_q, *args_of(prepared), isa)
            assert torch.equal(got, ref_int_mm(x_q, packed)), (layout, isa)


@pytest.mark.parametrize("m", [128, 200, 300, 4096])
@pytest.mark.parametrize("layout", ["quads", "gathered"])
def test_token_split_across_threads(m, layout):
    # M >= 64 x threads: each thread packs and multiplies its own token range (one parallel region)
    packed = pack(make_weight(70, 52, 0.8, "unstructured", m), "unstructured")
    prepared = derive(packed, layout)
    x = torch.randn(m, 52)
    x_q, x_scale = quantize_activations(x, ActQuant())
    want = dequantize(ref_int_mm(x_q, packed), x_scale, packed.scale, None, torch.bfloat16)
    for isa in ISAS:
        with threads(2):
            out = torch.full((m, 70), POISON_INT, dtype=torch.int32)
            torch.ops.sparse_ofa.cpu_int_mm_out(x_q, *args_of(prepared), out, isa)
            y = torch.full((m, 70), float("nan"), dtype=torch.bfloat16)
            torch.ops.sparse_ofa.cpu_linear_out(x, *args_of(prepared), packed.scale, None, 0.0, 0.0, 0, -127, 127,
                                                y, isa)
        assert torch.equal(out, ref_int_mm(x_q, packed)), isa
        assert torch.equal(y, want), isa


def test_layout_of_1x4_keeps_exactly_the_blocks():
    packed = pack(make_weight(64, 128, 0.9, "1x4", 5), "1x4")
    prepared = cpu_backend.derive_quads(packed)
    blocks = packed.values.view(-1, 4)
    kept = blocks[(blocks != 0).any(1)]  # a kept block that quantized to all zeros is skipped
    assert torch.equal(prepared["quad_w"].view(torch.int8).view(-1, 4), kept)
    assert torch.equal(prepared["row_ptr"], packed.row_offsets // 4) or kept.shape[0] < blocks.shape[0]


# ------------------------------------------------------------------------------------- quantize
def _special_rows(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, k // 2] = float("nan")
    if m > 3:
        x[3, 0] = float("inf")
    if m > 4:
        x[4, -1] = -float("inf")
    if m > 5:
        x[5] = x[5].abs().max()  # every value at amax: rounds exactly to 127
    if m > 6:
        x[6] = torch.arange(k) - k / 2 + 0.5  # exact .5 ties at scale 1 (static)
    return x


@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 300), isa=st.sampled_from(ISAS),
       static=st.sampled_from([None, (0.05, 0, -127, 127), (1.0, 3, -128, 127), (0.01, -20, -128, 10)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 999))
def test_quantize_matches_quant_py(m, k, isa, static, dtype, seed):
    x = _special_rows(m, k, seed).to(dtype)
    act = ActQuant() if static is None else ActQuant(scale=static[0], zero_point=static[1],
                                                     qmin=static[2], qmax=static[3])
    want_q, want_s = quantize_activations(x, act)
    q = (0.0, 0.0, 0, -127, 127) if static is None else (act.scale, act.inv_scale, *static[1:])
    got_q, got_s = torch.ops.sparse_ofa.cpu_quantize(x, *q, isa)
    assert torch.equal(got_q, want_q)
    assert torch.allclose(got_s, want_s, equal_nan=True, rtol=0, atol=0)  # NaN rows stay NaN



@SETTINGS
@given(m=st.integers(1, 300), n=st.integers(1, 600), k=st.integers(1, 90), row=st.sampled_from([512, 1024, 2048]),
       sparsity=st.sampled_from([0.0, 0.9, 1.0]), out_dtype=st.sampled_from([torch.int32, torch.float32, torch.bfloat16]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(ISAS), layout=st.sampled_from(["quads", "gathered"]),
       seed=st.integers(0, 999))
def test_outputs_with_rows_4kb_apart(m, n, k, row, sparsity, out_dtype, nthreads, isa, layout, seed):
    # output rows whose byte stride is a multiple of 2 KB take the AVX-512 epilogue's long runs
    # (up to 256 channels of a row written at once): every channel of the slice written exactly,
    # nothing to its left or right touched
    row = max(row, (n + 3 + 511) // 512 * 512)
    packed = pack(make_weight(n, k, sparsity, "unstructured", seed), "unstructured")
    prepared = derive(packed, layout)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x_q, x_scale = quantize_activations(x, ActQuant())
    acc = ref_int_mm(x_q, packed)
    if out_dtype == torch.int32:
        want, wide = acc, torch.full((m, row), POISON_INT, dtype=torch.int32)
    else:
        want = dequantize(acc, x_scale, packed.scale, None, out_dtype)
        wide = torch.full((m, row), -1234.0, dtype=out_dtype)  # finite: compared below
        wide[:, 3:3 + n] = float("nan")
    before = wide.clone()
    out = wide[:, 3:3 + n]
    with threads(nthreads):
        if out_dtype == torch.int32:
            torch.ops.sparse_ofa.cpu_int_mm_out(x_q, *args_of(prepared), out, isa)
        else:
            torch.ops.sparse_ofa.cpu_linear_out(x, *args_of(prepared), packed.scale, None, 0.0, 0.0, 0, -127, 127,
                                                out, isa)
    assert torch.equal(out, want)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + n:], before[:, 3 + n:])

# ------------------------------------------------------------------------------------- linear
@SETTINGS
@given(m=st.integers(1, 200), n=st.integers(1, 100), k=st.integers(1, 150),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), bias=st.booleans(),
       static=st.sampled_from([None, (0.02, 0, -127, 127), (0.03, 5, -128, 127)]),
       in_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       out_kind=st.sampled_from(["same", torch.float32, torch.bfloat16, torch.float16]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(ISAS),
       layout=st.sampled_from(["quads", "gathered"]), seed=st.integers(0, 999))
def test_linear_matches_reference(m, n, k, sparsity, bias, static, in_dtype, out_kind, nthreads, isa, layout,
                                  seed):
    packed = pack(make_weight(n, k, sparsity, "unstructured", seed), "unstructured")
    prepared = derive(packed, layout)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 0.3).to(in_dtype)
    b = torch.randn(n, generator=g) if bias else None
    out_dtype = in_dtype if out_kind == "same" else out_kind
    act = ActQuant() if static is None else ActQuant(scale=static[0], zero_point=static[1],
                                                     qmin=static[2], qmax=static[3])
    # the module folds a zero point into the bias; the kernel sees symmetric numerics + that bias
    x_q, x_scale = quantize_activations(x, act)
    acc = ref_int_mm(x_q, packed)
    if act.zero_point:
        b = act.fold_zero_point(b, unpack_int8(packed).sum(1, dtype=torch.int32), packed.scale)
    want = dequantize(acc, x_scale, packed.scale, b, out_dtype)
    q = (0.0, 0.0, 0, -127, 127) if static is None else (act.scale, act.inv_scale, *static[1:])
    with threads(nthreads):
        got = torch.ops.sparse_ofa.cpu_linear(x, *args_of(prepared), packed.scale, b, *q, out_dtype, isa)
    assert got.dtype == out_dtype and got.shape == (m, n)
    # same float operations in the same order (no FMA): identical, not just close
    assert torch.equal(got, want)
    if out_dtype in (torch.float32, torch.bfloat16):
        poisoned = torch.full((m, n), float("nan"), dtype=out_dtype)
        with threads(nthreads):
            torch.ops.sparse_ofa.cpu_linear_out(x, *args_of(prepared), packed.scale, b, *q, poisoned, isa)
        assert torch.equal(poisoned, want)


def test_nonfinite_token_gives_nonfinite_row_only():
    packed = pack(make_weight(8, 16, 0.0, "unstructured", 1), "unstructured")
    prepared = cpu_backend.derive_quads(packed)
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    for isa in ISAS:
        y = torch.ops.sparse_ofa.cpu_linear(x, *args_of(prepared), packed.scale, None, 0.0, 0.0, 0, -127, 127,
                                            torch.float32, isa)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ------------------------------------------------------------------------------------- module, dispatch
def test_module_cpu_backend_matches_reference_backend():
    from sparse_ofa import SparseInt8Linear

    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.mul_(make_weight(40, 96, 0.9, "1x4", 2) != 0)
    x = torch.randn(2, 7, 96)
    ours = SparseInt8Linear.from_linear(lin, backend="cpu")
    ref = SparseInt8Linear.from_linear(lin, backend="reference")
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours(x.bfloat16()), ref(x.bfloat16()))


def test_auto_dispatch_prefers_sparse_only_where_it_wins():
    from sparse_ofa import SparseInt8Linear

    sparse = torch.nn.Linear(256, 256)
    with torch.no_grad():
        sparse.weight.mul_(make_weight(256, 256, 0.9, "1x4", 4) != 0)
    mod = SparseInt8Linear.from_linear(sparse, backend="auto")
    assert mod.dispatch(128) == "cpu"
    assert mod.dispatch(1) == "dense"  # one token: dense INT8 reads the cache-hot weight faster
    lin = torch.nn.Linear(256, 256)
    dense = SparseInt8Linear.from_linear(lin, backend="auto")
    assert dense.dispatch(128) == "dense"  # 0 % sparse: dense INT8 wins, the layer is never slower
    x = torch.randn(128, 256)
    assert torch.equal(dense(x), SparseInt8Linear.from_linear(lin, backend="reference")(x))


@pytest.mark.skipif(ok and cpu_backend.ISAS[cpu_backend.best_isa()] < cpu_backend.ISAS["avx2"],
                    reason="gathered kernels need AVX2 or AVX-512")
def test_layout_choice_by_token_count(monkeypatch):
    packed = pack(make_weight(96, 256, 0.9, "unstructured", 9), "unstructured")
    prepared = cpu_backend.CpuBackend().prepare(packed)
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "scalar")  # no gathered kernel there: aligned quads
    assert int(cpu_backend.CpuBackend.choose(128, prepared)[-1][4]) == 0
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "avx2")  # the 256-bit paths have one, in 8 / 32-token steps
    assert int(cpu_backend.CpuBackend.choose(128, prepared)[-1][4]) == 1
    assert int(cpu_backend.CpuBackend.choose(4, prepared)[-1][4]) == 0
    eighty = cpu_backend.CpuBackend().prepare(pack(make_weight(96, 256, 0.8, "unstructured", 9), "unstructured"))
    assert int(cpu_backend.CpuBackend.choose(32, eighty)[-1][4]) == 1  # (in 64-token steps: aligned)
    monkeypatch.delenv("SPARSE_OFA_CPU_ISA")
    kind = {m: int(cpu_backend.CpuBackend.choose(m, prepared)[-1][4]) for m in (1, 128)}
    assert kind == {1: 0, 128: 1}  # 1 token: aligned quads (gathered works on 64); 128: gathered
    blocks = cpu_backend.CpuBackend().prepare(pack(make_weight(96, 256, 0.9, "1x4", 9), "1x4"))
    assert "g_quad_w" not in blocks  # 1x4 quads are already full


def test_dispatch_without_avx512(monkeypatch):
    from sparse_ofa.backends.base import LayerInfo

    info = LayerInfo(768, 768, "1x4", 0.1)
    backend = cpu_backend.CpuBackend()
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "scalar")
    assert not backend.prefers(128, info)  # the portable loop: always dense INT8
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "avx2")
    monkeypatch.setenv("SPARSE_OFA_DENSE_ROUTE", "int_mm")  # dense INT8 by VNNI oneDNN: half the work
    assert backend.prefers(128, info) and not backend.prefers(128, LayerInfo(768, 768, "1x4", 0.2))


def test_dispatch_on_avx2_against_the_panel_gemm(monkeypatch):
    # the AVX2 limits (`_THRESHOLDS_AVX2` in backends/cpu/dispatch.py, measured against the panel GEMM)
    from sparse_ofa.backends.base import LayerInfo

    backend = cpu_backend.CpuBackend()
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "avx2")
    monkeypatch.setenv("SPARSE_OFA_DENSE_ROUTE", "panel")
    for k, n in ((768, 768), (768, 3072), (3072, 768), (384, 1536)):
        for m in (16, 128, 1024):
            # 80 % / 70 % unstructured: work ~0.3 / ~0.45 in gathered quads from 64 tokens, 0.59 / 0.76
            # in aligned quads below; 60 % 0.6 (measured: sparse 5-12 % faster, inside the margin)
            assert backend.prefers(m, LayerInfo(k, n, "unstructured", 0.2)) == (m >= 64), (k, n, m)
            assert backend.prefers(m, LayerInfo(k, n, "unstructured", 0.3)) == (m >= 64), (k, n, m)
            assert not backend.prefers(m, LayerInfo(k, n, "unstructured", 0.4)), (k, n, m)
            assert backend.prefers(m, LayerInfo(k, n, "1x4", 0.5)), (k, n, m)
            assert not backend.prefers(m, LayerInfo(k, n, "1x4", 0.6)), (k, n, m)
        assert not backend.prefers(1, LayerInfo(k, n, "1x4", 0.1))  # one token: dense
        assert backend.prefers(4, LayerInfo(k, n, "1x4", 0.1)) and not backend.prefers(4, LayerInfo(k, n, "1x4", 0.2))
        # the 256-bit gathered kernel takes a rest of up to 32 tokens in one 32-token pass: 80 %
        # unstructured at 17-32 tokens costs ~0.3 gathered (0.6 if counted in 64-token passes)
        assert backend.prefers(32, LayerInfo(k, n, "unstructured", 0.2)), (k, n)


@pytest.mark.skipif(ok and cpu_backend.best_isa() != "avx512vnni", reason="limits measured on AVX-512")
def test_80_percent_unstructured_stays_sparse_at_many_tokens(monkeypatch):
    # whole models ran 2.4-6.5x faster with these layers sparse than dense at 1,408-12,288 tokens
    # (bench/NOTES.md, "CPU dispatch above 256 tokens"); 50 % stays dense, 1x4 80 % stays sparse
    from sparse_ofa.backends.base import LayerInfo

    monkeypatch.delenv("SPARSE_OFA_CPU_ISA", raising=False)
    backend = cpu_backend.CpuBackend()
    for k, n in ((384, 1536), (1536, 384), (768, 768)):
        for m in (1408, 4096, 12288):
            assert backend.prefers(m, LayerInfo(k, n, "unstructured", 0.2)), (k, n, m)
            assert backend.prefers(m, LayerInfo(k, n, "1x4", 0.2)), (k, n, m)
            assert not backend.prefers(m, LayerInfo(k, n, "unstructured", 0.5)), (k, n, m)
        for m in (128, 1408):  # whole models ran 8-25 % faster with these sparse (stop 12)
            assert backend.prefers(m, LayerInfo(k, n, "unstructured", 0.3)), (k, n, m)
            assert backend.prefers(m, LayerInfo(k, n, "1x4", 0.5)), (k, n, m)


@pytest.mark.skipif(ok and cpu_backend.best_isa() != "avx512vnni", reason="limits measured on AVX-512")
def test_90_percent_goes_sparse_from_five_tokens(monkeypatch):
    # whole models ran as fast or faster with these layers sparse from 5 to 32 tokens at 1 and 2
    # threads (the `_THRESHOLDS` comment in backends/cpu.py); one token and 50 % stay dense
    from sparse_ofa.backends.base import LayerInfo

    monkeypatch.delenv("SPARSE_OFA_CPU_ISA", raising=False)
    backend = cpu_backend.CpuBackend()
    for nthreads in (1, 2):
        with threads(nthreads):
            for k, n in ((384, 1536), (1536, 384), (768, 768)):
                for m in (5, 12, 23, 32):
                    assert backend.prefers(m, LayerInfo(k, n, "unstructured", 0.1)), (k, n, m)
                    assert backend.prefers(m, LayerInfo(k, n, "1x4", 0.3)), (k, n, m)
                    assert not backend.prefers(m, LayerInfo(k, n, "unstructured", 0.5)), (k, n, m)
                assert not backend.prefers(1, LayerInfo(k, n, "unstructured", 0.1)), (k, n)


@pytest.mark.skipif(ok and cpu_backend.best_isa() != "avx512vnni", reason="limits measured on AVX-512")
def test_few_tokens_go_sparse_at_two_threads_only(monkeypatch):
    # 80 % unstructured (aligned-quad work 0.59) and 90 % at 2-4 tokens: faster sparse at 2 threads,
    # slower at 1 (bench/NOTES.md, "Thread-aware dispatch"); 50 % and a single token stay dense
    from sparse_ofa.backends.base import LayerInfo

    monkeypatch.delenv("SPARSE_OFA_CPU_ISA", raising=False)
    backend = cpu_backend.CpuBackend()
    for k, n in ((384, 1536), (768, 3072)):
        for m in (2, 4, 12, 32):
            eighty, ninety = LayerInfo(k, n, "unstructured", 0.2), LayerInfo(k, n, "unstructured", 0.1)
            with threads(2):
                assert backend.prefers(m, eighty) and backend.prefers(m, ninety), (k, n, m)
                assert not backend.prefers(m, LayerInfo(k, n, "unstructured", 0.5)), (k, n, m)
            with threads(1):
                assert not backend.prefers(m, eighty), (k, n, m)
                assert backend.prefers(m, ninety) == (m > 4), (k, n, m)
        with threads(2):
            assert not backend.prefers(1, LayerInfo(k, n, "unstructured", 0.1))


@pytest.mark.skipif(ok and cpu_backend.best_isa() != "avx512vnni", reason="limits measured on AVX-512")
def test_cached_plan_follows_the_thread_count(monkeypatch):
    # forward() caches its backend choice per input shape: a later torch.set_num_threads must not
    # keep running the choice made for the old thread count
    from sparse_ofa import SparseInt8Linear

    monkeypatch.delenv("SPARSE_OFA_CPU_ISA", raising=False)
    calls = []
    for cls in (cpu_backend.CpuBackend, type(__import__("sparse_ofa").backends.get_backend("dense"))):
        original = cls.linear_fn
        monkeypatch.setattr(cls, "linear_fn", lambda self, *a, _o=original, _n=cls.name: calls.append(_n) or _o(self, *a))
    lin = torch.nn.Linear(384, 1536)
    with torch.no_grad():
        lin.weight.mul_(make_weight(1536, 384, 0.8, "unstructured", 5) != 0)
    mod = SparseInt8Linear.from_linear(lin, backend="auto")
    x = torch.randn(12, 384)
    ref = SparseInt8Linear.from_linear(lin, backend="reference")(x)
    # planned once per (shape, thread count), then taken from the cache
    for nthreads, want, planned in ((1, "dense", ["dense"]), (2, "cpu", ["cpu"]), (1, "dense", [])):
        calls.clear()
        with threads(nthreads):
            assert mod.dispatch(12) == want
            torch.testing.assert_close(mod(x), ref, rtol=0, atol=1e-4)
            mod(x)
        assert calls == planned, (nthreads, calls)


def test_isa_override(monkeypatch):
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "scalar")
    assert cpu_backend.isa_code() == 0
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        cpu_backend.isa_code()


def test_opcheck_fake_kernels():
    packed = pack(make_weight(24, 40, 0.5, "unstructured", 6), "unstructured")
    a = args_of(cpu_backend.derive_quads(packed))
    x_q = int8_acts(5, 40, 7)
    x = torch.randn(5, 40)
    torch.library.opcheck(torch.ops.sparse_ofa.cpu_int_mm.default, (x_q, *a, -1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sparse_ofa.cpu_linear.default,
                          (x, *a, packed.scale, None, 0.0, 0.0, 0, -127, 127, torch.float32, -1),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small():
    packed = pack(make_weight(16, 32, 0.5, "unstructured", 8), "unstructured")
    return packed, cpu_backend.derive_quads(packed)


def test_error_dtype(small):
    _, prepared = small
    with pytest.raises(RuntimeError, match="x_q must be int8"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 32), *args_of(prepared), -1)
    with pytest.raises(RuntimeError, match="x must be float32/bfloat16/float16"):
        torch.ops.sparse_ofa.cpu_linear(torch.zeros(2, 32, dtype=torch.int32), *args_of(prepared),
                                        small[0].scale, None, 0.0, 0.0, 0, -127, 127, torch.float32, -1)


def test_error_shape(small):
    packed, prepared = small
    with pytest.raises(RuntimeError, match="has 31 input features, the weight has 32"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 31, dtype=torch.int8), *args_of(prepared), -1)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 2, 32, dtype=torch.int8), *args_of(prepared), -1)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.sparse_ofa.cpu_int_mm_out(torch.zeros(2, 32, dtype=torch.int8), *args_of(prepared),
                                            torch.empty(3, 16, dtype=torch.int32), -1)
    with pytest.raises(RuntimeError, match="w_scale must have shape"):
        torch.ops.sparse_ofa.cpu_linear(torch.zeros(2, 32), *args_of(prepared), packed.scale[:5], None,
                                        0.0, 0.0, 0, -127, 127, torch.float32, -1)


def test_error_device_and_version(small):
    packed, prepared = small
    from sparse_ofa.backends.base import LayerInfo

    assert not cpu_backend.CpuBackend().supports(torch.device("cuda"), LayerInfo.of(packed))
    stale = dict(prepared, layout=prepared["layout"].clone())
    stale["layout"][0] = 99
    with pytest.raises(RuntimeError, match="layout version 99"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 32, dtype=torch.int8), *args_of(stale), -1)
    other = type(packed)(**{k: v.clone() for k, v in packed.tensors().items()})
    other.meta[0] = 2
    with pytest.raises(ValueError, match="format version 2"):
        cpu_backend.derive_quads(other)
    bad_ptr = dict(prepared, row_ptr=prepared["row_ptr"].clone())
    bad_ptr["row_ptr"][-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr must run from 0"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 32, dtype=torch.int8), *args_of(bad_ptr), -1)


def test_sixteen_bit_indices_reach_past_32767():
    # quad_k is read as uint16: channels >= 32768 (negative as int16) must still be found
    k = 40_003
    g = torch.Generator().manual_seed(4)
    w = torch.zeros(6, k)
    cols = torch.tensor([0, 32767, 32768, 39_999, 40_002])
    w[:, cols] = torch.randn(6, cols.numel(), generator=g)
    packed = pack(w, "unstructured")
    x_q = torch.randint(-128, 128, (9, k), dtype=torch.int8, generator=g)
    want = ref_int_mm(x_q, packed)
    gathered = cpu_backend.derive_gathered(packed)  # channel indices (aligned quads hold k / 4)
    assert gathered["quad_k"].dtype == torch.int16 and int(gathered["quad_k"].min()) < 0
    for prepared in (cpu_backend.derive_quads(packed), gathered):
        for isa in ISAS:
            assert torch.equal(torch.ops.sparse_ofa.cpu_int_mm(x_q, *args_of(prepared), isa), want)


def test_wider_than_sixteen_bits_keeps_another_backend():
    from sparse_ofa import SparseInt8Linear

    wide = torch.nn.Linear(65_540, 4)
    assert SparseInt8Linear.from_linear(wide).dispatch(8) != "cpu"
    with pytest.raises(ValueError, match="backend 'cpu' does not run"):
        SparseInt8Linear.from_linear(wide, backend="cpu")


def test_error_unsupported_isa_code(small):
    _, prepared = small
    with pytest.raises(RuntimeError, match="unknown ISA code 7"):
        torch.ops.sparse_ofa.cpu_int_mm(torch.zeros(2, 32, dtype=torch.int8), *args_of(prepared), 7)


def test_env_value_reads_what_os_environ_holds(monkeypatch):
    # the plans' fast read of $SPARSE_OFA_CPU_ISA must see every change made through os.environ
    from sparse_ofa.backends import env_value, plan_context

    monkeypatch.delenv("SPARSE_OFA_CPU_ISA", raising=False)
    assert env_value("SPARSE_OFA_CPU_ISA") is None and plan_context()[0] is None
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "avx2")
    assert env_value("SPARSE_OFA_CPU_ISA") == "avx2" and plan_context()[0] == "avx2"
    assert cpu_backend.isa_code() == cpu_backend.ISAS["avx2"]
    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "ünïcode")  # decoded as os.environ decodes it
    assert env_value("SPARSE_OFA_CPU_ISA") == os.environ["SPARSE_OFA_CPU_ISA"] == "ünïcode"
    monkeypatch.delenv("SPARSE_OFA_CPU_ISA")
    assert env_value("SPARSE_OFA_CPU_ISA") is None and cpu_backend.isa_code() == -1
    assert env_value("PATH") == os.environ["PATH"]
