"""torch.ops.sparse_ofa.cpu_attention(..., bf16=True) (csrc/cpu/attention_bf16.cpp): both attention
products on bf16 inputs with fp32 sums and an fp32 softmax. Checked against float64 attention whose
q, k, v and unnormalised probabilities are rounded to bf16 the same way (so the kernel must be far
closer to that than to exact attention), on odd shapes, every mask form, fully masked rows, huge
scores, strided and poisoned outputs, 1-2 threads; the fused projection + attention gives the same
bits; and the fast path's attention="bf16" runs it. Skipped on CPUs without AVX-512 BF16."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cpu_kernel_paths, threads
from test_cpu_attention import SHAPES, DYNAMIC, _qkv_layer, reference

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()
if cpu_backend is not None and not cpu_backend.bf16_attention_supported():
    pytestmark = pytest.mark.skip(reason="this CPU has no AVX-512 BF16")
AVX512 = 3  # cpu_backend.ISAS["avx512vnni"]


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.float().to(torch.bfloat16).double()


def reference_bf16(qkv: torch.Tensor, mask, heads: int, scale: float) -> torch.Tensor:
    """Float64 attention with the kernel's roundings: q, k, v to bf16; exp(s - max) to fp32, then the
    unnormalised probabilities to bf16 for the second product; their fp32 sum normalises."""
    b, s, three_h = qkv.shape
    d = three_h // (3 * heads)
    q, k, v = (t.reshape(b, s, heads, d).transpose(1, 2) for t in qkv.split(heads * d, -1))
    scores = (_bf16(q) @ _bf16(k).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    e = torch.exp(scores - scores.amax(-1, keepdim=True)).float().masked_fill(empty, 0.0)
    total = e.double().sum(-1, keepdim=True)
    out = (_bf16(e) @ _bf16(v)) / torch.where(total > 0, total, 1.0)
    return out.transpose(1, 2).reshape(b, s, heads * d).float()


def assert_bf16_accurate(got: torch.Tensor, qkv: torch.Tensor, mask, heads: int, scale: float) -> None:
    """On average within a twentieth of bf16's own error of the bf16-rounded reference: an fp32 kernel
    (or a wrong pairing of bf16 values) is as far from it as from exact attention. Element by element
    within one bf16 step of a probability times the largest |v|: the kernel's exp and fp32 score sums
    differ from the reference's in the last bits, which now and then rounds one probability to the
    neighbouring bf16 value."""
    diff = (got - reference_bf16(qkv, mask, heads, scale)).abs()
    exact = (got - reference(qkv, mask, heads, scale)).abs()
    assert diff.mean() <= 0.05 * exact.mean() + 1e-7, f"mean {diff.mean():.3g} from the bf16 reference, {exact.mean():.3g} from exact"
    v_max = qkv[..., 2 * qkv.shape[-1] // 3:].abs().max().item()
    assert diff.max() <= 2 * 2 ** -8 * v_max + 1e-5, f"max {diff.max():.3g}"


def run(qkv, mask, heads, scale):
    b, s, three_h = qkv.shape
    out = torch.full((b, s, three_h // 3), float("nan"))
    torch.ops.sparse_ofa.cpu_attention_out(qkv, mask, heads, scale, out, AVX512, True)
    return out


@pytest.mark.parametrize("shape", SHAPES + [(1, 33, 2, 33), (2, 64, 3, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "float_full"])
def test_matches_bf16_rounded_reference(shape, mask_kind):
    b, s, h, d = shape
    g = torch.Generator().manual_seed(b * 1000 + s * 10 + h)
    qkv = torch.randn(b, s, 3 * h * d, generator=g) * 2
    mask = None
    if mask_kind == "bool_pad":
        mask = torch.ones(b, 1, s, s, dtype=torch.bool)
        mask[-1, ..., max(1, s // 2):] = False
    elif mask_kind == "float_full":
        mask = torch.randn(b, h, s, s, generator=g)
        mask[..., 0] = -1e9
    assert_bf16_accurate(run(qkv, mask, h, d ** -0.5), qkv, mask, h, d ** -0.5)


@given(b=st.integers(1, 3), s=st.integers(1, 70), h=st.integers(1, 4), d=st.integers(1, 40),
       seed=st.integers(0, 2 ** 16), masked=st.booleans())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_shapes(b, s, h, d, seed, masked):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, 3 * h * d, generator=g)
    mask = (torch.rand(b, 1, 1, s, generator=g) > 0.3) if masked else None
    assert_bf16_accurate(run(qkv, mask, h, 0.3), qkv, mask, h, 0.3)


def test_fully_masked_rows_huge_scores_and_strided_outputs():
    qkv = torch.randn(2, 40, 3 * 2 * 32)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[1, 0, 3] = False  # query 3 of batch 1 sees no key
    add = torch.zeros(2, 1, 40, 40)
    add[0, 0, 5] = float("-inf")
    assert torch.equal(run(qkv, mask, 2, 0.25)[1, 3], torch.zeros(64))
    assert torch.equal(run(qkv, add, 2, 0.25)[0, 5], torch.zeros(64))
    huge = qkv * 300  # scores ~ 1e6: max subtracted first, one-hot softmax, finite
    got = run(huge, None, 2, 1.0)
    assert torch.isfinite(got).all()
    assert_bf16_accurate(got, huge, None, 2, 1.0)
    wide = torch.randn(2, 37, 3 * 3 * 24 + 5)  # rows with a gap; out into a slice of a poisoned buffer
    big = torch.full((2, 37, 2 * 72), float("nan"))
    torch.ops.sparse_ofa.cpu_attention_out(wide[..., 5:], None, 3, 0.2, big[..., 36:108], AVX512, True)
    assert_bf16_accurate(big[..., 36:108], wide[..., 5:].contiguous(), None, 3, 0.2)
    assert torch.isnan(big[..., :36]).all() and torch.isnan(big[..., 108:]).all()


def test_padding_keys_are_skipped_exactly():
    from test_cpu_attention import padding_masks

    s, h, d = 70, 3, 24
    lengths = [70, 1, 33, 64, 65, 0]
    qkv = torch.randn(len(lengths), s, 3 * h * d)
    bool_mask, add_mask = padding_masks(lengths, s)
    got = run(qkv, bool_mask, h, 0.3)
    assert_bf16_accurate(got, qkv, bool_mask, h, 0.3)
    assert torch.equal(got, run(qkv, add_mask, h, 0.3))  # the additive mask computes every key
    assert torch.equal(got[-1], torch.zeros(s, h * d))
    poisoned = qkv.clone()
    for b, n in enumerate(lengths):  # NaN k and v past the real keys (one key past an odd count: its
        poisoned[b, n + n % 2:, h * d:] = float("nan")  # pair's partner is read, with probability 0)
    assert torch.equal(run(poisoned, bool_mask, h, 0.3)[:-1], got[:-1])


def test_threads_do_not_change_the_result_and_bad_requests_are_named():
    qkv = torch.randn(3, 50, 3 * 5 * 32)
    mask = torch.rand(3, 1, 50, 50) > 0.1
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(torch.ops.sparse_ofa.cpu_attention(qkv, mask, 5, 0.17, AVX512, True))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="bf16=True needs the avx512vnni path"):
        torch.ops.sparse_ofa.cpu_attention(qkv, mask, 5, 0.17, 0, True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert torch.ops.sparse_ofa.cpu_attention(torch.empty(2, 7, 96), None, 4, 0.25, -1, True).shape == (2, 7, 32)


@given(b=st.integers(1, 3), s=st.integers(1, 150), h=st.integers(1, 4), d=st.integers(1, 40),
       k=st.integers(1, 90), seed=st.integers(0, 10_000), gathered=st.booleans(),
       mask=st.sampled_from(["none", "bool_keys", "float_full"]), nthreads=st.sampled_from([1, 2]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_qkv_attention_equals_projection_then_attention(b, s, h, d, k, seed, gathered, mask, nthreads):
    """Bit for bit: from the channel-major projection the bf16 pairs are the same numbers."""
    packed, args, bias = _qkv_layer(h * d, k, seed, gathered)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, s, k, generator=g)
    masks = {"none": None, "bool_keys": torch.rand(b, 1, 1, s, generator=g) > 0.3,
             "float_full": torch.randn(b, h, s, s, generator=g)}
    with threads(nthreads):
        qkv = torch.ops.sparse_ofa.cpu_linear(x, *args, packed.scale, bias, *DYNAMIC, torch.float32, AVX512)
        want = torch.ops.sparse_ofa.cpu_attention(qkv, masks[mask], h, 0.3, AVX512, True)
        got = torch.ops.sparse_ofa.cpu_qkv_attention(x, args, packed.scale, bias, *DYNAMIC, masks[mask], h, 0.3,
                                                     AVX512, True)
    assert torch.equal(got, want)


def test_fast_path_bf16_mode_runs_the_bf16_kernel_from_32_keys(monkeypatch):
    import copy

    from sparse_ofa import sparsify
    from sparse_ofa import fastpath

    from conftest import tiny_pruned_bert

    fp32 = sparsify(tiny_pruned_bert(0.6), backend="cpu")
    fast = copy.deepcopy(fp32)
    fastpath.apply_fastpath(fast, attention="bf16")
    seen = []
    real = torch.ops.sparse_ofa.cpu_qkv_attention.default

    class Recorder:  # stands in for the op inside the cached plans: records its bf16 flag
        def __call__(self, *args):
            seen.append(args[-1])
            return real(*args)

    monkeypatch.setattr(torch.ops.sparse_ofa.cpu_qkv_attention, "default", Recorder())
    with torch.inference_mode():
        for seq in (40, 20):
            ids = torch.randint(0, 60, (2, seq))
            seen.clear()
            got = fast(input_ids=ids).last_hidden_state
            assert seen and all(flag == (seq >= fastpath.BF16_MIN_KEYS) for flag in seen), (seq, seen)
            want = fp32(input_ids=ids).last_hidden_state
            cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min()
            assert cos > 0.999 and (seq < fastpath.BF16_MIN_KEYS or not torch.equal(got, want))
