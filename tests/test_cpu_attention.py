"""torch.ops.sparse_ofa.cpu_attention (csrc/cpu/attention*.cpp) against attention computed in float64,
on every path this machine runs (AVX-512 and the portable one): odd shapes, masks of every broadcast
form, fully masked rows, huge scores, strided inputs, poisoned outputs, 1-2 threads, bad input. And
the fast path really uses it. No timings (bench/test_e2e_cpu.py has those)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cpu_kernel_paths, threads

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()  # every ISA path this CPU runs


def reference(qkv: torch.Tensor, mask, heads: int, scale: float) -> torch.Tensor:
    """Softmax attention in float64; a row whose keys are all masked gives zeros (as torch's SDPA)."""
    b, s, three_h = qkv.shape
    d = three_h // (3 * heads)
    q, k, v = (t.reshape(b, s, heads, d).transpose(1, 2).double() for t in qkv.split(heads * d, -1))
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (probs @ v).transpose(1, 2).reshape(b, s, heads * d).float()


def assert_accurate(got: torch.Tensor, qkv: torch.Tensor, mask, heads: int, scale: float) -> None:
    """At most twice the float32 error of torch's own SDPA (the kernel it replaces) against float64."""
    want = reference(qkv, mask, heads, scale)
    b, s, three_h = qkv.shape
    d = three_h // (3 * heads)
    q, k, v = (t.reshape(b, s, heads, d).transpose(1, 2) for t in qkv.split(heads * d, -1))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    sdpa_err = (sdpa.reshape(b, s, heads * d) - want).abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 2 * sdpa_err + 2e-6, f"max error {err:.3g} vs torch SDPA's {sdpa_err:.3g}"


def run(qkv, mask, heads, scale, isa, poison_out=True):
    b, s, three_h = qkv.shape
    out = torch.full((b, s, three_h // 3), float("nan"))
    if poison_out:
        torch.ops.sparse_ofa.cpu_attention_out(qkv, mask, heads, scale, out, isa)
        return out
    return torch.ops.sparse_ofa.cpu_attention(qkv, mask, heads, scale, isa)


SHAPES = [(1, 128, 12, 64), (2, 7, 3, 16), (3, 33, 2, 24), (1, 1, 1, 8), (2, 130, 4, 80), (1, 17, 5, 32),
          (2, 64, 6, 48), (1, 5, 2, 1)]


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "float_keys", "float_full"])
def test_matches_float64_reference(isa, shape, mask_kind):
    b, s, h, d = shape
    g = torch.Generator().manual_seed(b * 1000 + s * 10 + h)
    qkv = torch.randn(b, s, 3 * h * d, generator=g) * 2
    mask = None
    if mask_kind == "bool_pad":  # HF's padding mask: [B, 1, S, S], later keys of the last row masked
        mask = torch.ones(b, 1, s, s, dtype=torch.bool)
        mask[-1, ..., max(1, s // 2):] = False
    elif mask_kind == "float_keys":  # additive key mask [B, 1, 1, S]
        mask = torch.randn(b, 1, 1, s, generator=g)
    elif mask_kind == "float_full":  # [B, H, S, S], with some finite large negatives
        mask = torch.randn(b, h, s, s, generator=g)
        mask[..., 0] = -1e9
    assert_accurate(run(qkv, mask, h, d ** -0.5, isa), qkv, mask, h, d ** -0.5)


@given(b=st.integers(1, 3), s=st.integers(1, 70), h=st.integers(1, 4), d=st.integers(1, 40),
       seed=st.integers(0, 2 ** 16), masked=st.booleans())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_shapes(b, s, h, d, seed, masked):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, 3 * h * d, generator=g)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.3) if masked else None
    for isa in PATHS:
        assert_accurate(run(qkv, mask, h, 0.3, isa), qkv, mask, h, 0.3)


@pytest.mark.parametrize("isa", PATHS)
def test_fully_masked_rows_give_zeros(isa):
    qkv = torch.randn(2, 20, 3 * 2 * 16)
    mask = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    mask[1, 0, 3] = False  # query 3 of batch 1 sees no key
    add = torch.zeros(2, 1, 20, 20)
    add[0, 0, 5] = float("-inf")
    for m in (mask, add):
        assert_accurate(run(qkv, m, 2, 0.25, isa), qkv, m, 2, 0.25)
    assert torch.equal(run(qkv, mask, 2, 0.25, isa)[1, 3], torch.zeros(32))
    assert torch.equal(run(qkv, add, 2, 0.25, isa)[0, 5], torch.zeros(32))


@pytest.mark.parametrize("isa", PATHS)
def test_huge_scores_stay_finite(isa):
    # scores ~ 1e6: exp must not overflow (max subtracted first); the softmax becomes one-hot
    qkv = torch.randn(1, 40, 3 * 2 * 32) * 300
    got = run(qkv, None, 2, 1.0, isa)
    assert torch.isfinite(got).all()
    assert_accurate(got, qkv, None, 2, 1.0)


@pytest.mark.parametrize("isa", PATHS)
def test_strided_inputs_and_outputs(isa):
    # qkv rows with a gap (a column slice of a wider tensor); a transposed (non-contiguous) mask;
    # out written into every other row block of a larger buffer: neighbours must stay untouched
    wide = torch.randn(2, 19, 3 * 3 * 24 + 5)
    qkv = wide[..., 5:]
    mask = (torch.rand(2, 1, 19, 19) > 0.2).transpose(-1, -2)
    mask[..., 0] = True
    big = torch.full((2, 19, 2 * 72), float("nan"))
    out = big[..., 36:108]
    torch.ops.sparse_ofa.cpu_attention_out(qkv, mask, 3, 0.2, out, isa)
    assert_accurate(out, qkv.contiguous(), mask, 3, 0.2)
    assert torch.isnan(big[..., :36]).all() and torch.isnan(big[..., 108:]).all()


def padding_masks(lengths, s: int):
    """HF's mask of a right-padded batch, bool [B, 1, S, S] (key j of row b real iff j < lengths[b]),
    and the same as an additive mask (0 / -inf)."""
    real = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    bool_mask = real[:, None, None, :].expand(len(lengths), 1, s, s).contiguous()
    return bool_mask, torch.zeros(bool_mask.shape).masked_fill(~bool_mask, float("-inf"))


@pytest.mark.parametrize("isa", PATHS)
def test_padding_keys_are_skipped_exactly(isa):
    """A padded batch: keys masked in every row are not computed on the vector paths (their probability is
    exactly 0). Exact: the bool mask (skips them) gives the same bits as the same mask written
    additively (computes them, exp(-inf) = 0), and K / V holding NaN at those keys change nothing."""
    s, h, d = 70, 3, 24
    lengths = [70, 1, 33, 64, 65, 0]  # full, one key, odd, a whole 64-key vector, one past it, none
    qkv = torch.randn(len(lengths), s, 3 * h * d)
    bool_mask, add_mask = padding_masks(lengths, s)
    got = run(qkv, bool_mask, h, 0.3, isa)
    assert_accurate(got, qkv, bool_mask, h, 0.3)
    assert torch.equal(got, run(qkv, add_mask, h, 0.3, isa))
    assert torch.equal(got[-1], torch.zeros(s, h * d))  # no key at all: zeros, as torch's SDPA
    if isa != 0:  # the portable path computes every key (0 * NaN there is NaN)
        poisoned = qkv.clone()
        for b, n in enumerate(lengths):
            poisoned[b, n:, h * d:] = float("nan")  # k and v of the padding tokens
        assert torch.equal(run(poisoned, bool_mask, h, 0.3, isa)[:-1], got[:-1])


def test_threads_do_not_change_the_result():
    qkv = torch.randn(3, 50, 3 * 5 * 32)
    mask = torch.rand(3, 1, 50, 50) > 0.1
    with threads(1):
        one = run(qkv, mask, 5, 0.17, -1, poison_out=False)
    with threads(2):
        two = run(qkv, mask, 5, 0.17, -1, poison_out=False)
    assert torch.equal(one, two)


def test_nan_input_shows_where_it_flows():
    for isa in PATHS:
        qkv = torch.randn(1, 9, 3 * 2 * 16)
        qkv[0, 4, 2 * 32 + 3] = float("nan")  # value channel 3 of head 0, token 4: every query reads it
        nan = torch.isnan(run(qkv, None, 2, 0.25, isa)[0])
        assert nan[:, 3].all() and nan.sum() == 9
        qkv = torch.randn(1, 9, 3 * 2 * 16)
        qkv[0, 4, 32 + 16 + 5] = float("nan")  # a key of head 1: every score row of head 1 is NaN
        nan = torch.isnan(run(qkv, None, 2, 0.25, isa)[0])
        assert nan[:, 16:].all() and not nan[:, :16].any()


@pytest.mark.parametrize("bad, message", [
    (lambda: torch.randn(2, 4, 24).double(), "qkv must be float32"),
    (lambda: torch.randn(8, 24), "qkv must be 3-D"),
    (lambda: torch.randn(2, 4, 25), "is not 3 x heads x head_dim"),
])
def test_bad_qkv(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sparse_ofa.cpu_attention(bad(), None, 2, 0.5)


def test_bad_mask_and_out():
    qkv = torch.randn(2, 4, 24)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        torch.ops.sparse_ofa.cpu_attention(qkv, torch.ones(2, 1, 4, 5, dtype=torch.bool), 2, 0.5)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.sparse_ofa.cpu_attention(qkv, torch.ones(2, 1, 4, 4, dtype=torch.int64), 2, 0.5)
    with pytest.raises(RuntimeError, match="heads must be >= 1"):
        torch.ops.sparse_ofa.cpu_attention(qkv, None, 0, 0.5)
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 4, 8\]"):
        torch.ops.sparse_ofa.cpu_attention_out(qkv, None, 2, 0.5, torch.empty(2, 4, 9))


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.sparse_ofa.cpu_attention(torch.empty(2, 7, 96), None, 4, 0.25)
    assert out.shape == (2, 7, 32)


def test_fast_path_runs_the_kernel(monkeypatch):
    """sparsify()'s default attention on an AVX-512 CPU is this kernel; "sdpa" keeps torch's."""
    from transformers import BertConfig, BertModel

    from sparse_ofa import magnitude_prune_, sparsify
    from sparse_ofa.backends.cpu import CpuBackend
    from sparse_ofa.fastpath import apply_fastpath

    if cpu_backend.best_isa() != "avx512vnni":
        pytest.skip("the fused attention is used on AVX-512 CPUs only")
    model = BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                 intermediate_size=96, attn_implementation="sdpa"), add_pooling_layer=False)
    magnitude_prune_(model.eval(), 0.5)
    model = sparsify(model)
    calls = []  # what each forward's check answered
    real = CpuBackend.attention_runs
    monkeypatch.setattr(CpuBackend, "attention_runs", lambda self, *a: calls.append(real(self, *a)) or calls[-1])
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.inference_mode():
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert calls and all(calls)
        apply_fastpath(model, attention="sdpa")
        calls.clear()
        sdpa = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not calls  # "sdpa" never asks
    torch.testing.assert_close(fused, sdpa, rtol=1e-5, atol=1e-5)


# ---- cpu_qkv_attention: the fused QKV projection + attention as one op ---------------------------
DYNAMIC = (0.0, 0.0, 0, -127, 127)


def _qkv_layer(hidden: int, k: int, seed: int, gathered: bool):
    from sparse_ofa.formats import pack

    from conftest import sparse_weight

    g = torch.Generator().manual_seed(seed)
    packed = pack(sparse_weight(3 * hidden, k, 0.7, generator=g), "unstructured")
    prepared = cpu_backend.derive_gathered(packed) if gathered else cpu_backend.derive_quads(packed)
    return packed, list(cpu_backend.CpuBackend._args(prepared)), torch.randn(3 * hidden, generator=g)


@given(b=st.integers(1, 3), s=st.integers(1, 150), h=st.integers(1, 4), d=st.integers(1, 40),
       k=st.integers(1, 90), seed=st.integers(0, 10_000), gathered=st.booleans(),
       mask=st.sampled_from(["none", "bool_keys", "float_full", "bool_rows"]), quant=st.sampled_from(["dyn", "static"]),
       nthreads=st.sampled_from([1, 2]), isa=st.sampled_from(PATHS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_qkv_attention_equals_projection_then_attention(b, s, h, d, k, seed, gathered, mask, quant, nthreads, isa):
    """Bit for bit cpu_attention(cpu_linear(x)): the channel-major projection (K^T read in place, V
    transposed) does the same sums in the same order; small token counts take the two ops."""
    packed, args, bias = _qkv_layer(h * d, k, seed, gathered)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, s, k, generator=g)
    masks = {"none": None, "bool_keys": torch.rand(b, 1, 1, s, generator=g) > 0.3,
             "float_full": torch.randn(b, h, s, s, generator=g), "bool_rows": torch.rand(b, 1, s, s, generator=g) > 0.5}
    act = (0.05, 20.0, 0, -127, 127) if quant == "static" else DYNAMIC
    with threads(nthreads):
        qkv = torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *act, torch.float32, isa)
        want = torch.ops.sparse_ofa.cpu_attention(qkv, masks[mask], h, 0.3, isa)
        torch.full((b, s, h * d), float("nan"))  # a freed NaN block for the output's allocation
        got = torch.ops.sparse_ofa.cpu_qkv_attention(x, args, packed.scale, bias, *act, masks[mask], h, 0.3, isa)
    assert torch.equal(got, want)


def test_qkv_attention_bad_input_is_named():
    packed, args, bias = _qkv_layer(8, 16, 1, False)
    x = torch.randn(2, 5, 16)
    op = torch.ops.sparse_ofa.cpu_qkv_attention
    with pytest.raises(RuntimeError, match="w must be the 5 layout tensors"):
        op(x, args[:3], packed.scale, bias, *DYNAMIC, None, 2, 0.5)
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        op(x[0], args, packed.scale, bias, *DYNAMIC, None, 2, 0.5)
    with pytest.raises(RuntimeError, match=r"24 outputs are not 3 x heads x head_dim for heads = 5"):
        op(x, args, packed.scale, bias, *DYNAMIC, None, 5, 0.5)
    with pytest.raises(RuntimeError, match="has 15 input features, the weight has 16"):
        op(torch.randn(2, 5, 15), args, packed.scale, bias, *DYNAMIC, None, 2, 0.5)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, args, packed.scale, bias[:5], *DYNAMIC, None, 2, 0.5)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        op(x, args, packed.scale, bias, *DYNAMIC, torch.ones(2, 1, 1, 4, dtype=torch.bool), 2, 0.5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = [a.shape for a in args]
    with FakeTensorMode():
        fake = op(torch.empty(2, 5, 16), [torch.empty(shape) for shape in shapes], torch.empty(24), None, *DYNAMIC,
                  None, 2, 0.5)
    assert fake.shape == (2, 5, 8)


def test_fast_path_runs_projection_and_attention_as_one_op(monkeypatch):
    """On an AVX-512 CPU the fast attention is cpu_qkv_attention, with the same output as the
    projection op followed by the attention op."""
    import copy

    from sparse_ofa import sparsify
    from sparse_ofa.fastpath import attention as fast_attention

    from conftest import tiny_pruned_bert

    if cpu_backend.best_isa() != "avx512vnni":
        pytest.skip("the fused projection + attention runs on AVX-512 CPUs only")
    fast = sparsify(tiny_pruned_bert(0.6), backend="cpu")
    two_ops = copy.deepcopy(fast)
    ids = torch.randint(0, 60, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.inference_mode(), threads(1):
        fast(input_ids=ids, attention_mask=mask)
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        fused = [key for layer in fast.encoder.layer
                 for key, fn in layer.attention.self._sparse_ofa_qkv[1]._plans.items()
                 if key[0] == "qkv_attention" and callable(fn)]
        monkeypatch.setattr(fast_attention, "_qkv_attention_plan", lambda *a: None)
        two_ops(input_ids=ids, attention_mask=mask)
        want = two_ops(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(fused) == 2 and torch.equal(got, want)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("b,s", [(1, 12), (1, 64), (2, 128), (3, 100)])
def test_qkv_attention_tile_edges_every_path(isa, b, s):
    """Every ISA path at token counts around the 64-token tiles (12: a short tile; 256 = 2 x 128: the
    channel-major qkv gets its padded row stride), fresh inputs with large and zero tokens, both
    layouts, 1 and 2 threads: bit for bit the two ops, and close to torch's SDPA on that projection."""
    h, d, k = 3, 16, 40
    for gathered in (False, True):
        packed, args, bias = _qkv_layer(h * d, k, 7 + s, gathered)
        g = torch.Generator().manual_seed(b * 1000 + s)
        x = torch.randn(b, s, k, generator=g)
        x[0, 1] *= 1e4
        x[-1, -1] = 0.0
        mask = torch.rand(b, 1, 1, s, generator=g) > 0.2
        mask[..., 0] = True
        for nthreads in (1, 2):
            with threads(nthreads):
                qkv = torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *DYNAMIC, torch.float32, isa)
                want = torch.ops.sparse_ofa.cpu_attention(qkv, mask, h, 0.25, isa)
                torch.full((b, s, h * d), float("nan"))
                got = torch.ops.sparse_ofa.cpu_qkv_attention(x, args, packed.scale, bias, *DYNAMIC, mask, h, 0.25,
                                                              isa)
            assert torch.equal(got, want)
            assert_accurate(got, qkv, mask, h, 0.25)
