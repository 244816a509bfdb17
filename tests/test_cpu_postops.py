"""The fused linear's post-ops (torch.ops.sparse_ofa.cpu_linear ..., residual, gelu, ln_weight, ln_bias,
ln_eps; csrc/cpu/postops*.cpp) on the AVX-512, AVX2 and portable paths: `+ residual` bit-exact, GELU and
LayerNorm against float64, poisoned outputs, strided buffers, threads, bad input; and the fast path's
use of them (fuse=True / False). No timings."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ofa.formats import pack

from conftest import cpu_kernel_paths, threads, tiny_pruned_bert

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()  # every ISA path this CPU runs
if cpu_backend is not None and cpu_backend.best_isa() != "scalar":
    PATHS = sorted({*PATHS, 1})  # and the AVX2 post-ops (postops_avx2.cpp)

DYNAMIC = (0.0, 0.0, 0, -127, 127)  # per-token activation quantization


def layer(n: int, k: int, seed: int, sparsity: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) >= sparsity)
    packed = pack(w, "unstructured")
    prepared = cpu_backend.derive_quads(packed)
    return packed, cpu_backend.CpuBackend._args(prepared), torch.randn(n, generator=g)


def linear(x, args, packed, bias, isa, **post):
    return torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *DYNAMIC, torch.float32, isa,
                                           post.get("residual"), post.get("gelu", False),
                                           post.get("ln_weight"), post.get("ln_bias"), post.get("ln_eps", 1e-12))


def gelu64(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))


@given(m=st.integers(1, 150), n=st.integers(1, 90), k=st.integers(1, 80), seed=st.integers(0, 999),
       residual=st.booleans(), gelu=st.booleans(), norm=st.sampled_from([None, "weight", "weight+bias"]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(PATHS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_post_ops_match_float64(m, n, k, seed, residual, gelu, norm, nthreads, isa):
    packed, args, bias = layer(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g)
    r = torch.randn(m, n, generator=g) * 3 if residual else None
    ln_w = torch.randn(n, generator=g) if norm else None
    ln_b = torch.randn(n, generator=g) if norm == "weight+bias" else None
    # each stage against float64 computed from the kernel's own previous stage, so that a stage is
    # judged by its own error (LayerNorm divides by the row's spread: it would amplify GELU's 1e-6)
    with threads(nthreads):
        base = linear(x, args, packed, bias, isa)
        added = linear(x, args, packed, bias, isa, residual=r)
        act = linear(x, args, packed, bias, isa, residual=r, gelu=gelu)
        got = linear(x, args, packed, bias, isa, residual=r, gelu=gelu, ln_weight=ln_w, ln_bias=ln_b, ln_eps=1e-5)
    assert torch.equal(added, base + r if residual else base)  # float32 add: bit-identical to torch's
    if gelu:  # within 1.5e-6 of exact GELU (torch's own fp32 gelu: 1.2e-6)
        assert ((act.double() - gelu64(added)).abs() <= 1.5e-6 + 2e-7 * added.double().abs()).all()
    else:
        assert torch.equal(act, added)
    if not norm:
        assert torch.equal(got, act)
        return
    y = act.double()
    mean = y.mean(-1, keepdim=True)
    std = torch.sqrt(((y - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    want = (y - mean) / std * ln_w.double() + (ln_b.double() if ln_b is not None else 0.0)
    # fp32 statistics: a few ulps of the row's largest value, relative to the row's spread
    tol = 4e-7 * (1 + y.abs().amax(-1, keepdim=True) / std) * ln_w.double().abs() + 1e-6
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("isa", PATHS)
def test_extremes(isa):
    packed, args, _ = layer(40, 32, 3)
    x = torch.randn(5, 32)
    huge = torch.full((40,), 1e4)
    huge[::2] = -1e4
    got = linear(x, args, packed, huge, isa, gelu=True)  # GELU(+1e4) = 1e4, GELU(-1e4) = 0
    base = linear(x, args, packed, huge, isa)
    assert torch.equal(got[:, 1::2], base[:, 1::2]) and torch.equal(got[:, ::2], torch.zeros(5, 20))
    # a constant row has variance 0: eps keeps it finite, the output is the LayerNorm bias
    zero_w = pack(torch.zeros(40, 32), "unstructured")
    zargs = cpu_backend.CpuBackend._args(cpu_backend.derive_quads(zero_w))
    ln_w, ln_b = torch.randn(40), torch.randn(40)
    const = linear(x, zargs, zero_w, torch.full((40,), 2.0), isa, ln_weight=ln_w, ln_bias=ln_b, ln_eps=1e-12)
    torch.testing.assert_close(const, ln_b.expand(5, 40), rtol=0, atol=1e-6)


@pytest.mark.parametrize("isa", PATHS)
def test_gelu_over_a_wide_range(isa):
    """GELU of every value in [-40, 40] (the bias of an all-zero weight): within 1.5e-6 of exact,
    also where the erf approximation's r^16 would underflow into denormals (|x| > ~17, capped)."""
    values = torch.linspace(-40, 40, 4001)
    zero_w = pack(torch.zeros(4001, 8), "unstructured")
    zargs = cpu_backend.CpuBackend._args(cpu_backend.derive_quads(zero_w))
    got = linear(torch.randn(3, 8), zargs, zero_w, values, isa, gelu=True)
    want = gelu64(values).expand(3, -1)
    assert ((got.double() - want).abs() <= 1.5e-6 + 2e-7 * values.double().abs()).all()
    assert torch.equal(got[:, values >= 8], values[values >= 8].expand(3, -1))  # GELU(x) = x in fp32 there


@pytest.mark.parametrize("isa", PATHS)
def test_poisoned_strided_out_and_residual(isa):
    packed, args, bias = layer(37, 29, 5)
    x = torch.randn(70, 29)
    wide_r = torch.randn(70, 50)
    r = wide_r[:, 3:40]  # rows 50 apart
    ln_w, ln_b = torch.randn(37), torch.randn(37)
    big = torch.full((70, 60), float("nan"))
    out = big[:, 10:47]
    with threads(2):
        torch.ops.sparse_ofa.cpu_linear_out(x, *args, packed.scale, bias, *DYNAMIC, out, isa, r, True, ln_w, ln_b,
                                            1e-12)
        want = linear(x, args, packed, bias, isa, residual=r.contiguous(), gelu=True, ln_weight=ln_w, ln_bias=ln_b)
    assert torch.equal(out, want)
    assert torch.isnan(big[:, :10]).all() and torch.isnan(big[:, 47:]).all()


def test_any_leading_shape():
    packed, args, bias = layer(24, 40, 2)
    x = torch.randn(2, 3, 5, 40)
    r = torch.randn(2, 3, 5, 24)
    for isa in PATHS:
        flat = linear(x.reshape(-1, 40), args, packed, bias, isa, residual=r.reshape(-1, 24), gelu=True)
        got = linear(x, args, packed, bias, isa, residual=r, gelu=True)
        assert got.shape == (2, 3, 5, 24) and torch.equal(got.reshape(-1, 24), flat)
        one = linear(x[0, 0, 0], args, packed, bias, isa)
        assert one.shape == (24,) and torch.equal(one, linear(x[0, 0, :1], args, packed, bias, isa)[0])


def test_threads_and_paths_agree():
    packed, args, bias = layer(64, 96, 7)
    x = torch.randn(300, 96)
    r = torch.randn(300, 64)
    ln_w = torch.randn(64)
    outs = []
    for nthreads in (1, 2):
        with threads(nthreads):
            outs.append(linear(x, args, packed, bias, PATHS[-1], residual=r, gelu=True, ln_weight=ln_w))
    assert torch.equal(outs[0], outs[1])  # rows are finished independently of the thread split


def test_bad_post_ops_are_named():
    packed, args, bias = layer(8, 16, 1)
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape .* got \[4, 9\]"):
        linear(x, args, packed, bias, -1, residual=torch.randn(4, 9))
    out = torch.empty(4, 8)
    with pytest.raises(RuntimeError, match=r"residual must have shape \[4, 8\]"):  # the _out form checks 2-D
        torch.ops.sparse_ofa.cpu_linear_out(x, *args, packed.scale, bias, *DYNAMIC, out, -1, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="residual must be float32"):
        linear(x, args, packed, bias, -1, residual=torch.randn(4, 8).double())
    with pytest.raises(RuntimeError, match="ln_weight must have shape"):
        linear(x, args, packed, bias, -1, ln_weight=torch.randn(7))
    with pytest.raises(RuntimeError, match="ln_bias given without ln_weight"):
        linear(x, args, packed, bias, -1, ln_bias=torch.randn(8))
    with pytest.raises(RuntimeError, match="ln_eps must be > 0"):
        linear(x, args, packed, bias, -1, ln_weight=torch.randn(8), ln_eps=0.0)
    with pytest.raises(RuntimeError, match="post-ops need a float32 output"):
        torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *DYNAMIC, torch.bfloat16, -1, None, True)


def test_fast_path_fuses_and_can_be_told_not_to():
    from sparse_ofa import sparsify
    from sparse_ofa.fastpath import apply_fastpath

    if cpu_backend.best_isa() == "scalar":
        pytest.skip("the post-ops are fused on AVX2 and AVX-512 CPUs only")
    model = tiny_pruned_bert(0.6)
    plain = sparsify(copy.deepcopy(model), backend="cpu", fastpath=False)
    fast = sparsify(model, backend="cpu")
    ids = torch.randint(0, 60, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    calls = []
    attn_out = fast.encoder.layer[0].attention.output.dense
    original = attn_out.direct
    attn_out.direct = lambda x, **post: calls.append(sorted(post)) or original(x, **post)
    with torch.inference_mode():
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        fused = [fast(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2)][1]
        assert ["norm", "residual"] in calls  # attention output ran add + LayerNorm as its kernel's post-ops
        apply_fastpath(fast, attention="sdpa", fuse=False)
        exact = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert all(layer._sparse_ofa_layer_mode == "tensor" for layer in fast.encoder.layer)
    assert torch.equal(exact, want)  # no post-ops, torch's SDPA: the plain path's numbers, bit for bit
    assert (fused - want).norm() <= 1e-3 * want.norm()
