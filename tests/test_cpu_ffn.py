"""The fused feed-forward op torch.ops.sparse_ofa.cpu_ffn (csrc/cpu_ffn.cpp, csrc/cpu/ffn_avx512.cpp)
and its Python entry sparse_ofa.ffn.feed_forward: bit for bit the two fused linears it replaces,
cpu_linear(cpu_linear(x, gelu), residual, LayerNorm), over random shapes (K and the intermediate
width not multiples of 4), both weight layouts for each layer, static and dynamic activation
quantization, NaN/Inf tokens, 1 and 2 threads; bad input named. No timings."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ofa.formats import pack
from sparse_ofa.masks import magnitude_mask

from conftest import cpu_kernel_paths, sparse_weight, threads, tiny_pruned_bert

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()

DYNAMIC = (0.0, 0.0, 0, -127, 127)


def static(scale: float, zero_point: int = 0, qmin: int = -127, qmax: int = 127) -> tuple:
    return (scale, 1.0 / scale, zero_point, qmin, qmax)


def weight(n: int, k: int, seed: int, pattern: str, sparsity: float, gathered: bool):
    """(packed, the 5 layout tensors of kind 1 'gathered' or 0 'aligned quads', bias)."""
    g = torch.Generator().manual_seed(seed)
    packed = pack(sparse_weight(n, k, sparsity, pattern, generator=g), pattern)
    prepared = cpu_backend.derive_gathered(packed) if gathered else cpu_backend.derive_quads(packed)
    return packed, list(cpu_backend.CpuBackend._args(prepared)), torch.randn(n, generator=g)


def two_linears(x, first, second, q1, q2, isa, gelu=True, residual=None, ln=(None, None), eps=1e-5):
    (p1, a1, b1), (p2, a2, b2) = first, second
    mid = torch.ops.sparse_ofa.cpu_linear(x, *a1, p1.scale, b1, *q1, torch.float32, isa, None, gelu)
    return torch.ops.sparse_ofa.cpu_linear(mid, *a2, p2.scale, b2, *q2, torch.float32, isa, residual, False,
                                           ln[0], ln[1], eps)


def ffn(x, first, second, q1, q2, isa, gelu=True, residual=None, ln=(None, None), eps=1e-5):
    (p1, a1, b1), (p2, a2, b2) = first, second
    return torch.ops.sparse_ofa.cpu_ffn(x, a1, p1.scale, b1, *q1, a2, p2.scale, b2, *q2, gelu, residual, ln[0],
                                        ln[1], eps, isa)


def poison_allocator(shape) -> None:
    """Leave a freed NaN block of the output's size for the allocator to hand out next, so that an
    unwritten output element shows as NaN."""
    torch.full(shape, float("nan"))


@given(m=st.integers(1, 200), k=st.integers(1, 70), h=st.integers(1, 110), seed=st.integers(0, 10_000),
       pattern=st.sampled_from(["unstructured", "1x4"]), gathered=st.tuples(st.booleans(), st.booleans()),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0 - 1e-9]), quant=st.sampled_from(["dyn", "static", "mixed"]),
       gelu=st.booleans(), residual=st.booleans(), norm=st.sampled_from([None, "w", "w+b"]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(PATHS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_equals_two_fused_linears(m, k, h, seed, pattern, gathered, sparsity, quant, gelu, residual, norm,
                                  nthreads, isa):
    if pattern == "1x4":  # blocks of 4 input channels: K and the intermediate width are multiples of 4
        k, h = 4 * ((k + 3) // 4), 4 * ((h + 3) // 4)
    first = weight(h, k, seed, pattern, sparsity, gathered[0])
    second = weight(k, h, seed + 1, pattern, sparsity, gathered[1])
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(m, k, generator=g) * 3
    q1 = static(0.05) if quant in ("static", "mixed") else DYNAMIC
    q2 = static(0.5, zero_point=-3, qmin=-128, qmax=127) if quant == "static" else DYNAMIC
    r = torch.randn(m, k, generator=g) if residual else None
    ln = (torch.randn(k, generator=g) if norm else None, torch.randn(k, generator=g) if norm == "w+b" else None)
    with threads(nthreads):
        want = two_linears(x, first, second, q1, q2, isa, gelu, r, ln)
        poison_allocator((m, k))
        got = ffn(x, first, second, q1, q2, isa, gelu, r, ln)
    assert torch.equal(got, want)


def test_nonfinite_tokens_and_overflow():
    """NaN/Inf in the input or in the intermediate (a huge input row) take the exact per-token
    quantizer, as in the row-major path; the other tokens are unaffected."""
    first = weight(96, 64, 1, "1x4", 0.5, False)
    x = torch.randn(150, 64)
    x[3, 5] = float("nan")
    x[70, :] = 3e38  # intermediate overflows to +-Inf in every channel of token 70
    x[71, 0] = float("inf")
    x[140, :] = 0.0  # all-zero token: scale 0
    for isa, gathered in itertools.product(PATHS, (True, False)):  # the second layer in either layout
        second = weight(64, 96, 2, "unstructured", 0.5, gathered)
        for nthreads in (1, 2):
            with threads(nthreads):
                want = two_linears(x, first, second, DYNAMIC, DYNAMIC, isa)
                got = ffn(x, first, second, DYNAMIC, DYNAMIC, isa)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            assert torch.isfinite(got[torch.arange(150) != 3][:, 0]).sum() >= 140


def test_bert_base_shape_any_leading_dims():
    first = weight(3072, 768, 3, "1x4", 0.9, False)
    second = weight(768, 3072, 4, "1x4", 0.9, False)
    x = torch.randn(2, 128, 768)
    r = torch.randn(2, 128, 768)
    ln = (torch.randn(768), torch.randn(768))
    for nthreads in (1, 2):
        with threads(nthreads):
            want = two_linears(x.reshape(-1, 768), first, second, DYNAMIC, DYNAMIC, PATHS[-1], True,
                               r.reshape(-1, 768), ln, 1e-12)
            got = ffn(x, first, second, DYNAMIC, DYNAMIC, PATHS[-1], True, r, ln, 1e-12)
        assert got.shape == (2, 128, 768) and torch.equal(got.reshape(-1, 768), want)


def test_bad_input_is_named():
    first = weight(24, 16, 1, "unstructured", 0.5, False)
    second = weight(16, 24, 2, "unstructured", 0.5, False)
    other = weight(16, 20, 3, "unstructured", 0.5, False)
    x = torch.randn(4, 16)
    (p1, a1, b1), (p2, a2, b2) = first, second
    with pytest.raises(RuntimeError, match="w1 must be the 5 layout tensors"):
        torch.ops.sparse_ofa.cpu_ffn(x, a1[:4], p1.scale, b1, *DYNAMIC, a2, p2.scale, b2, *DYNAMIC)
    with pytest.raises(RuntimeError, match="w1 has 24 outputs but w2 takes 20 inputs"):
        ffn(x, first, other, DYNAMIC, DYNAMIC, -1)
    with pytest.raises(RuntimeError, match="has 15 input features, the weight has 16"):
        ffn(torch.randn(4, 15), first, second, DYNAMIC, DYNAMIC, -1)
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape .* got \[4, 9\]"):
        ffn(x, first, second, DYNAMIC, DYNAMIC, -1, residual=torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="x must be float32/bfloat16/float16"):
        ffn(x.double(), first, second, DYNAMIC, DYNAMIC, -1)
    with pytest.raises(RuntimeError, match="w1_scale must have shape"):
        torch.ops.sparse_ofa.cpu_ffn(x, a1, p1.scale[:3], b1, *DYNAMIC, a2, p2.scale, b2, *DYNAMIC, isa=PATHS[-1])
    stale = list(a1)
    stale[4] = stale[4].clone()
    stale[4][0] = 1
    with pytest.raises(RuntimeError, match="layout version 1"):
        torch.ops.sparse_ofa.cpu_ffn(x, stale, p1.scale, b1, *DYNAMIC, a2, p2.scale, b2, *DYNAMIC)


def _modules(h: int, k: int, backend: str = "cpu"):
    from sparse_ofa import SparseInt8Linear

    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(k, h), torch.nn.Linear(h, k)
    for lin in (lin1, lin2):
        lin.weight.data *= magnitude_mask(lin.weight.data, 0.8, "1x4")
    return (SparseInt8Linear.from_linear(lin1, backend=backend), SparseInt8Linear.from_linear(lin2, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_feed_forward_equals_direct_calls_and_follows_layout_rebuilds(backend):
    from sparse_ofa.fastpath.ffn import feed_forward

    first, second = _modules(80, 48, backend)
    x, r = torch.randn(3, 50, 48), torch.randn(3, 50, 48)
    norm = (torch.randn(48), torch.randn(48), 1e-5)
    with torch.inference_mode():
        want = second.direct(first.direct(x, gelu=True), residual=r, norm=norm)
        assert torch.equal(feed_forward(first, second, x, residual=r, norm=norm), want)
        assert torch.equal(feed_forward(first, second, x, gelu=False),
                           second.direct(first.direct(x)))
        # a layout rebuild of either module drops the cached plan: the new weights are used
        second.load_state_dict({**second.state_dict(), "bias": torch.zeros(48)})
        want = second.direct(first.direct(x, gelu=True), residual=r, norm=norm)
        assert torch.equal(feed_forward(first, second, x, residual=r, norm=norm), want)
        with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 48\)"):
            feed_forward(first, second, torch.randn(3, 47))
        with pytest.raises(ValueError, match="first has 80 output features but second takes 48"):
            feed_forward(first, first, x)


def test_fast_path_runs_the_feed_forward_as_one_op():
    from sparse_ofa import sparsify
    from sparse_ofa.fastpath import layer as fastpath_layer

    if cpu_backend.best_isa() != "avx512vnni":
        pytest.skip("the fused feed-forward op runs on AVX-512 CPUs only")
    fast = sparsify(tiny_pruned_bert(0.6), backend="cpu")
    ids = torch.randint(0, 60, (2, 70))
    composed = copy.deepcopy(fast)
    ops = []
    with torch.inference_mode(), threads(1):
        fast(input_ids=ids)  # first call: checked against the model's own forward
        original = fastpath_layer.feed_forward
        try:
            fastpath_layer.feed_forward = lambda *a, **kw: ops.append(1) or original(*a, **kw)
            got = fast(input_ids=ids).last_hidden_state
            # the same layers with the two fused linears instead of the one op
            fastpath_layer.feed_forward = lambda first, second, x, residual, norm: second.direct(
                first.direct(x, gelu=True), residual=residual, norm=norm)
            composed(input_ids=ids)
            want = composed(input_ids=ids).last_hidden_state
        finally:
            fastpath_layer.feed_forward = original
    assert len(ops) == 2 and torch.equal(got, want)


def test_empty_and_one_dimensional_inputs():
    first = weight(12, 8, 5, "unstructured", 0.5, False)
    second = weight(8, 12, 6, "unstructured", 0.5, False)
    for shape in [(0, 8), (3, 0, 8), (8,), (2, 3, 8)]:
        x = torch.randn(*shape)
        got = ffn(x, first, second, DYNAMIC, DYNAMIC, PATHS[-1])
        want = two_linears(x.reshape(-1, 8), first, second, DYNAMIC, DYNAMIC, PATHS[-1]).reshape(shape)
        assert got.shape == shape and torch.equal(got, want)


@pytest.mark.parametrize("isa", PATHS)
def test_tile_edges_every_path(isa):
    """Every ISA path at token counts around the 64-token tiles (the 256-bit paths take the fused route
    from 32 tokens on and compute only the live 8-token vectors of a short tile), fresh inputs with a
    huge and an all-zero token, static and dynamic quantization, both layouts: bit for bit the two
    fused linears, output poisoned before each run."""
    for m in (31, 32, 33, 40, 63, 64, 65, 97, 128, 130):
        for gathered in ((False, True), (True, False)):
            first = weight(52, 36, m, "unstructured", 0.8, gathered[0])
            second = weight(36, 52, m + 1, "unstructured", 0.8, gathered[1])
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, 36, generator=g)
            x[m // 2] *= 1e5
            x[m - 1] = 0.0
            r = torch.randn(m, 36, generator=g)
            ln = (torch.randn(36, generator=g), torch.randn(36, generator=g))
            for q2 in (DYNAMIC, static(0.5, zero_point=-3, qmin=-128, qmax=127)):
                with threads(1):
                    want = two_linears(x, first, second, DYNAMIC, q2, isa, True, r, ln)
                    poison_allocator((m, 36))
                    got = ffn(x, first, second, DYNAMIC, q2, isa, True, r, ln)
                assert torch.equal(got, want), (m, gathered, q2)


@pytest.mark.parametrize("isa", [code for code in PATHS if code in (1, 2)])
def test_fast_path_takes_the_fused_ops_on_the_256_bit_paths(isa, monkeypatch):
    """With $SPARSE_OFA_CPU_ISA on AVX2 / AVX-VNNI the lean layer calls cpu_ffn and cpu_qkv_attention
    (up to backends.cpu.dispatch.MAX_KEYS_256 keys); the FFN op gives the bits of the two linears, the attention
    kernel torch SDPA's numbers to fp32 rounding."""
    from sparse_ofa import sparsify
    from sparse_ofa.backends.cpu import ISA_NAMES, ISAS, dispatch

    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", ISA_NAMES[isa])
    fast = sparsify(tiny_pruned_bert(0.6), backend="cpu")
    unfused = copy.deepcopy(fast)
    ids = torch.randint(0, 60, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.inference_mode(), threads(1):
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        plans = [key[0] for layer in fast.encoder.layer
                 for module in (layer.attention.self._sparse_ofa_qkv[1], layer.intermediate.dense)
                 for key, fn in module._plans.items() if callable(fn)]
        assert plans.count("qkv_attention") == 2 and plans.count("ffn") == 2
        monkeypatch.setattr(dispatch, "ATTENTION_OP_ISAS", frozenset({ISAS["avx512vnni"]}))
        no_attention = copy.deepcopy(unfused)(input_ids=ids, attention_mask=mask).last_hidden_state
        monkeypatch.setattr(dispatch, "FFN_OP_ISAS", frozenset({ISAS["avx512vnni"]}))
        want = unfused(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(no_attention, want)  # the FFN op alone changes no bit
