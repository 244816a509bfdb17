"""The reference op is the oracle: check it against independent int64 / float64 computations."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparse_ofa import ActQuant, pack, unpack
from sparse_ofa.backends import get_backend
from sparse_ofa.formats import PackedWeight, unpack_int8
from sparse_ofa.quant import quantize_per_token, quantize_static

from conftest import sparse_weight


def _int64_product(x_q, w_q):
    return (x_q.long()[:, None, :] * w_q.long()[None, :, :]).sum(-1)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(0, 9), n=st.integers(1, 24), k=st.integers(1, 70),
       sparsity=st.sampled_from([0.0, 0.3, 0.9, 0.99]), seed=st.integers(0, 2**31 - 1),
       extremes=st.booleans())
def test_reference_int_mm_exact(m, n, k, sparsity, seed, extremes):
    g = torch.Generator().manual_seed(seed)
    w = sparse_weight(n, k, sparsity, generator=g)
    if extremes:  # every kept weight at +-max -> int8 +-127; activations at the int8 limits
        w = torch.sign(w)
        x_q = torch.where(torch.rand(m, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    else:
        x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    packed = pack(w)
    ref = get_backend("reference")
    got = ref.int_mm(x_q, ref.prepare(packed))
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.long(), _int64_product(x_q, unpack_int8(packed)))


def test_int32_extreme_accumulation():
    k = 4096  # 4096 * 128 * 127 fits int32 with room; all products the same sign
    x_q = torch.full((2, k), -128, dtype=torch.int8)
    packed = pack(-torch.ones(3, k))
    ref = get_backend("reference")
    got = ref.int_mm(x_q, ref.prepare(packed))
    assert int(got[0, 0]) == k * 128 * 127


def test_per_token_quantization_rules():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-3.0, 1.5, 0.01]])
    x_q, scale = quantize_per_token(x)
    assert scale[0] == 0 and x_q[0].tolist() == [0, 0, 0]         # all-zero token
    assert x_q[1].tolist() == [127, -64, 32]                       # round half to even: 63.5 -> 64
    assert x_q[2].tolist() == [-127, 64, 0]
    assert torch.allclose(scale[1:], torch.tensor([1.0, 3.0]) / 127)
    # the amax element maps to +-127 exactly and dequantization is within half a step
    x2 = torch.randn(64, 33) * torch.logspace(-3, 3, 64)[:, None]
    q2, s2 = quantize_per_token(x2)
    assert int(q2.abs().amax(1).min()) == 127
    assert bool(((q2.float() * s2[:, None] - x2).abs() <= s2[:, None] / 2 * (1 + 1e-5)).all())


def test_nonfinite_token_gives_nonfinite_row_only():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    packed = pack(sparse_weight(5, 8, 0.5))
    ref = get_backend("reference")
    y = ref.linear(x, ref.prepare(packed), packed.scale, None, ActQuant(), torch.float32)
    assert bool(torch.isfinite(y[[0, 2]]).all()) and not bool(torch.isfinite(y[1]).any())


def test_static_quantization_with_zero_point():
    act = ActQuant(scale=0.05, zero_point=-20, qmin=-128, qmax=127)
    x = torch.tensor([[0.0, 1.0, -10.0, 100.0]])
    x_q, scale = quantize_static(x, act)
    assert x_q.tolist() == [[-20, 0, -128, 127]] and scale.tolist() == [pytest.approx(0.05)]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 12), k=st.integers(1, 40),
       sparsity=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 2**31 - 1),
       static=st.booleans())
def test_reference_linear_matches_float64(m, n, k, sparsity, seed, static):
    """The fused reference = float64 math on the dequantized operands, up to float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    w = sparse_weight(n, k, sparsity, generator=g)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    act = ActQuant(scale=0.02, zero_point=0, qmin=-127, qmax=127) if static else ActQuant()
    packed = pack(w)
    ref = get_backend("reference")
    y = ref.linear(x, ref.prepare(packed), packed.scale, bias, act, torch.float32)
    x_q, x_scale = quantize_static(x, act) if static else quantize_per_token(x)
    expect = (x_q.double() * x_scale.double()[:, None]) @ unpack(packed).double().T + bias.double()
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-5)
