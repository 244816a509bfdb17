import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparse_ofa import FORMAT_VERSION, pack, unpack, unpack_int8
from sparse_ofa.formats import (detect_pattern, kept_mask, pack_bits, quantize_weight, unpack_bits)

from conftest import sparse_weight


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k4=st.integers(1, 30), sparsity=st.floats(0, 0.99),
       pattern=st.sampled_from(["unstructured", "1x4", "2:4"]), seed=st.integers(0, 2**31 - 1),
       extra_k=st.integers(0, 3))
def test_pack_unpack_exact(n, k4, sparsity, pattern, seed, extra_k):
    g = torch.Generator().manual_seed(seed)
    k = 4 * k4 + (extra_k if pattern == "unstructured" else 0)
    if pattern == "2:4":
        sparsity = 0.5  # below 0.5 a magnitude mask is not yet 2:4
    w = sparse_weight(n, k, sparsity, pattern, generator=g)
    packed = pack(w, pattern).validate()
    w_q, scale = quantize_weight(w)
    assert torch.equal(unpack_int8(packed), w_q)          # int8 values exact
    assert torch.equal(unpack(packed), w_q.float() * scale[:, None])
    assert torch.equal(kept_mask(packed), (w != 0) if pattern != "1x4" else
                       (w != 0).view(n, -1, 4).any(-1).repeat_interleave(4, 1))
    assert packed.nnz == int(kept_mask(packed).sum())
    # dequantized weight is within half a quantization step of the float weight
    assert bool(((unpack(packed) - w).abs() <= scale[:, None] / 2 + 1e-6).all())


def test_extreme_values_and_scales():
    w = torch.tensor([[1e-30, -1e-30, 0.0, 0.0], [3e30, -3e30, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    packed = pack(w)
    assert unpack_int8(packed).tolist() == [[127, -127, 0, 0], [127, -127, 0, 0], [0, 0, 0, 0]]
    assert packed.scale[2] == 1.0  # all-zero row: scale 1, nothing stored
    assert packed.row_offsets.tolist() == [0, 2, 5, 5]  # 1.0 quantizes to 0 but stays kept


def test_bit_layout_is_lsb_first():
    kept = torch.zeros(2, 11, dtype=torch.bool)
    kept[0, 0] = kept[0, 9] = kept[1, 7] = True
    bits = pack_bits(kept)
    assert bits.tolist() == [[1, 2], [128, 0]]
    assert torch.equal(unpack_bits(bits, 11), kept)


def test_byte_layout_documented():
    w = torch.tensor([[0.0, 2.0, 0.0, -1.0, 0.5]])
    p = pack(w, "unstructured")
    assert p.meta.tolist() == [FORMAT_VERSION, 1, 5, 0, 1]
    assert p.mask.tolist() == [[0b11010]]          # k = 1, 3 and 4 kept
    assert p.values.tolist() == [127, -64, 32]      # round-half-even(-63.5) = -64
    assert p.row_offsets.tolist() == [0, 3]
    w4 = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4.0]])
    p4 = pack(w4, "1x4")
    assert p4.meta.tolist()[3:] == [1, 4] and p4.mask.tolist() == [[0b10]] and p4.values.numel() == 4


def test_detect_pattern():
    w = sparse_weight(16, 32, 0.9, "1x4")
    assert detect_pattern(w) == "1x4"
    assert detect_pattern(sparse_weight(16, 32, 0.5, "2:4")) == "2:4"
    assert detect_pattern(sparse_weight(64, 64, 0.9)) == "unstructured"
    assert detect_pattern(torch.randn(8, 8)) == "unstructured"
    assert detect_pattern(sparse_weight(8, 10, 0.5)) == "unstructured"  # K % 4 != 0


def test_pattern_violations_are_named():
    w = sparse_weight(8, 16, 0.6)
    with pytest.raises(ValueError, match="1x4.*partly zero"):
        pack(w, "1x4")
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        pack(torch.randn(4, 8), "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        pack(torch.randn(4, 6), "1x4")
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        pack(w, "4:8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_rejected(bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="layer7: 1 NaN/Inf"):
        pack(w, name="layer7")


def test_bad_weight_kinds():
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        pack(torch.ones(4, 4, dtype=torch.int32))


def test_validate_rejects_other_version_and_corruption():
    p = pack(sparse_weight(8, 16, 0.5))
    p.meta = p.meta.clone()
    p.meta[0] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="format version"):
        p.validate()
    p = pack(sparse_weight(8, 16, 0.5))
    p.values = p.values[:-1]
    with pytest.raises(ValueError, match="values"):
        p.validate()
    p = pack(sparse_weight(8, 16, 0.5))
    p.row_offsets = torch.zeros_like(p.row_offsets)
    with pytest.raises(ValueError, match="row_offsets"):
        p.validate()


def test_packed_bytes_at_90_percent():
    p = pack(sparse_weight(768, 768, 0.9))
    assert 768 * 768 * 4 / p.nbytes() >= 15
