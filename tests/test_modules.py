import pytest
import torch
from torch import nn

from sparse_ofa import ActQuant, FORMAT_VERSION, SparseInt8Linear, pack
from sparse_ofa.backends import get_backend
from sparse_ofa.quant import quantize_per_token

from conftest import sparse_weight


def _linear(n=24, k=40, sparsity=0.8, pattern="unstructured", bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(sparse_weight(n, k, sparsity, pattern))
    return lin


def _expected(module, x):
    """The reference backend's fused output for x (2-D), independent of the module's dispatch."""
    ref = get_backend("reference")
    return ref.linear(x.float(), ref.prepare(module.packed), module.weight_scale, module.bias,
                      module.act, torch.float32)


@pytest.mark.parametrize("shape", [(40,), (5, 40), (2, 3, 40), (0, 40), (2, 0, 40)])
def test_input_ranks_and_empty(shape):
    m = SparseInt8Linear.from_linear(_linear())
    x = torch.randn(shape)
    y = m(x)
    assert y.shape == shape[:-1] + (24,)
    if x.numel():
        assert torch.equal(y.reshape(-1, 24), _expected(m, x.reshape(-1, 40)))


def test_close_to_float_linear():
    lin = _linear(64, 128, 0.9)
    m = SparseInt8Linear.from_linear(lin)
    x = torch.randn(16, 128)
    y, ref = m(x), lin(x).detach()
    assert (y - ref).norm() / ref.norm() < 0.02


def test_non_contiguous_input():
    m = SparseInt8Linear.from_linear(_linear())
    x = torch.randn(40, 7).t()            # [7, 40], strides (1, 7)
    assert not x.is_contiguous()
    assert torch.equal(m(x), m(x.contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_same_dtype(dtype):
    m = SparseInt8Linear.from_linear(_linear())
    x = torch.randn(6, 40).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    assert torch.allclose(y.float(), _expected(m, x), rtol=1e-2, atol=1e-2)


def test_model_half_keeps_scales_float32():
    m = SparseInt8Linear.from_linear(_linear()).half()
    assert m.weight_scale.dtype == torch.float32 and m.bias.dtype == torch.float32
    assert m(torch.randn(3, 40, dtype=torch.half)).dtype == torch.half


def test_all_zero_and_dense_rows():
    w = sparse_weight(6, 16, 0.5)
    w[0] = 0
    w[1] = torch.randn(16).abs() + 0.1
    lin = nn.Linear(16, 6)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = SparseInt8Linear.from_linear(lin)
    x = torch.randn(4, 16)
    y = m(x)
    assert torch.allclose(y[:, 0], lin.bias.detach()[0].expand(4))   # all-zero row: bias only
    assert torch.equal(y, _expected(m, x))


def test_backends_agree_exactly():
    lin = _linear(33, 45, 0.7)
    x = torch.randn(9, 45)
    ys = {b: SparseInt8Linear.from_linear(lin, backend=b)(x) for b in ("reference", "dense")}
    assert torch.equal(ys["reference"], ys["dense"])


def test_static_activation_with_zero_point_folds_into_bias():
    lin = _linear(12, 20, 0.5)
    act = ActQuant(scale=0.03, zero_point=-17, qmin=-128, qmax=127)
    m = SparseInt8Linear.from_linear(lin, act=act)
    x = torch.randn(5, 20)
    # Independent computation: exact integer sum of (x_q - z) * w_q, then scales and bias
    from sparse_ofa.formats import unpack_int8
    from sparse_ofa.quant import quantize_static

    x_q, _ = quantize_static(x, act)
    acc = (x_q.long() + 17) @ unpack_int8(m.packed).long().T
    expect = acc.double() * 0.03 * m.weight_scale.double() + lin.bias.double()
    assert torch.allclose(m(x).double(), expect, rtol=1e-5, atol=1e-5)
    assert "static int8" in repr(m)


def test_extra_repr_and_properties():
    m = SparseInt8Linear.from_linear(_linear(16, 32, 0.75, "1x4"))
    text = repr(m)
    assert "pattern=1x4" in text and "sparsity=75.0%" in text and "backend=auto" in text
    assert m.in_features == 32 and m.out_features == 16
    assert m.dispatch(4) in ("cpu", "dense")


def test_state_dict_has_only_packed_weight_and_round_trips():
    lin = _linear(24, 40, 0.9)
    m = SparseInt8Linear.from_linear(lin)
    sd = m.state_dict()
    assert set(sd) == {"weight_mask", "weight_values", "weight_row_offsets", "weight_scale",
                       "weight_meta", "bias"}
    assert sd["weight_values"].numel() == int((lin.weight != 0).sum())
    shell = SparseInt8Linear(40, 24)
    shell.load_state_dict(sd)
    x = torch.randn(7, 40)
    assert torch.equal(shell(x), m(x))


def test_state_dict_static_act_round_trips():
    m = SparseInt8Linear.from_linear(_linear(), act=ActQuant(0.1, 3, -128, 127))
    shell = SparseInt8Linear(40, 24)
    shell.load_state_dict(m.state_dict())
    assert shell.act == m.act
    x = torch.randn(3, 40)
    assert torch.equal(shell(x), m(x))


def test_load_rejects_other_format_version_and_wrong_shape():
    sd = SparseInt8Linear.from_linear(_linear()).state_dict()
    sd["weight_meta"] = sd["weight_meta"].clone()
    sd["weight_meta"][0] = FORMAT_VERSION + 1
    with pytest.raises(RuntimeError, match="format version"):
        SparseInt8Linear(40, 24).load_state_dict(sd)
    sd = SparseInt8Linear.from_linear(_linear()).state_dict()
    with pytest.raises(RuntimeError, match=r"packed weight is \(24, 40\)"):
        SparseInt8Linear(40, 25).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        SparseInt8Linear(40, 24).load_state_dict({"bias": torch.zeros(24)})


def test_bad_inputs_are_named():
    m = SparseInt8Linear.from_linear(_linear())
    with pytest.raises(TypeError, match="float32/bfloat16/float16.*torch.int64"):
        m(torch.ones(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(\.\.\., 40\).*\(2, 39\)"):
        m(torch.randn(2, 39))
    with pytest.raises(ValueError, match="input is on meta"):
        m(torch.randn(2, 40, device="meta"))
    with pytest.raises(TypeError, match="expects a tensor"):
        m([1.0] * 40)


def test_bad_weights_are_named():
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        SparseInt8Linear.from_linear(lin)
    with pytest.raises(TypeError, match="needs an nn.Linear, got Conv1d"):
        SparseInt8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="does not follow the '1x4' pattern"):
        SparseInt8Linear.from_linear(_linear(8, 16, 0.6), pattern="1x4")
    with pytest.raises(ValueError, match="unknown backend"):
        SparseInt8Linear.from_linear(_linear(), backend="tpu")


def test_explicit_backend_is_used():
    m = SparseInt8Linear.from_linear(_linear(), backend="reference")
    assert m.dispatch(1) == m.dispatch(4096) == "reference"
    m.set_backend("dense")
    assert m.dispatch(1) == "dense"


def test_quantized_activation_matches_reference_rules():
    # the module quantizes exactly as quant.quantize_per_token: compare integer products
    m = SparseInt8Linear.from_linear(_linear(8, 16, 0.5, bias=False))
    x = torch.randn(4, 16)
    x_q, x_scale = quantize_per_token(x)
    from sparse_ofa.formats import unpack_int8

    acc = x_q.double() @ unpack_int8(m.packed).double().T
    expect = acc * x_scale.double()[:, None] * m.weight_scale.double()
    assert torch.allclose(m(x).double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference", "dense", "cpu"])
def test_direct_equals_forward(backend, monkeypatch):
    from sparse_ofa.backends import availability

    if not availability(backend if backend != "auto" else "reference")[0]:
        pytest.skip(f"{backend} unavailable here")
    m = SparseInt8Linear.from_linear(_linear(48, 40, 0.9, "1x4"), backend=backend)
    for shape in [(1, 40), (5, 40), (2, 70, 40), (128, 40), (5, 40)]:  # a repeated M reuses its plan
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            # forward() runs the cached plan too; _forward_traced dispatches afresh (torch.compile's path)
            want = m._forward_traced(x)
            assert torch.equal(m.direct(x), want) and torch.equal(m(x), want), (shape, dtype)
    assert len(m._plans) == 8  # one plan per (input shape, dtype), shared by forward() and direct()
    if backend == "cpu":  # the ISA knob is part of the plan's key
        monkeypatch.setenv("SPARSE_OFA_CPU_ISA", "scalar")
        x = torch.randn(5, 40)
        assert torch.equal(m.direct(x), m._forward_traced(x)) and len(m._plans) == 9


def test_forward_plan_follows_set_backend(monkeypatch):
    """forward() caches its call plan per input shape; switching the backend must drop it."""
    from sparse_ofa.backends.reference import ReferenceBackend

    calls = []
    original = ReferenceBackend.int_mm
    monkeypatch.setattr(ReferenceBackend, "int_mm", lambda self, *a: calls.append(1) or original(self, *a))
    m = SparseInt8Linear.from_linear(_linear(24, 40, 0.8), backend="dense")
    x = torch.randn(6, 40)
    y = m(x)
    assert m(x) is not None and not calls
    m.set_backend("reference")
    assert torch.equal(m(x), y) and len(calls) == 1


def test_direct_follows_rebuilds_and_pickles():
    import copy
    import pickle

    m = SparseInt8Linear.from_linear(_linear(24, 40, 0.8))
    x = torch.randn(6, 40)
    before = m.direct(x)
    other = SparseInt8Linear.from_linear(_linear(24, 40, 0.5))
    m.load_state_dict(other.state_dict())  # new weights: the cached plan must not survive
    assert not m._plans
    assert torch.equal(m.direct(x), other(x)) and not torch.equal(m.direct(x), before)
    m.set_backend("reference")
    assert not m._plans and torch.equal(m.direct(x), other(x))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):  # closures are never pickled
        assert torch.equal(clone.direct(x), other(x))


def test_direct_bad_input_raises_like_forward():
    m = SparseInt8Linear.from_linear(_linear(24, 40))
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 40\)"):
        m.direct(torch.randn(3, 41))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        m.direct(torch.randn(3, 40).double())
