"""Triton sparse-INT8 kernels (kernels/): int32 results bit-exact against the reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors. TRITON_INTERPRET must be
set before *triton itself* is first imported (its own library functions such as tl.cumsum are
decorated then), which another test file may already have done in this process. So on a machine
without a GPU, the kernel tests here run in a child pytest with TRITON_INTERPRET=1 from the start
(test_kernels_under_the_interpreter); nothing leaks into this process. Shapes stay small: the
interpreter runs every program in numpy. No bf16 inside interpreted kernels (numpy has none).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_ofa.formats import kept_mask, pack, unpack_int8
from sparse_ofa.kernels import layouts
from sparse_ofa.quant import dequantize, quantize_per_token
from conftest import sparse_weight

ON_GPU = torch.cuda.is_available()
RUN_KERNELS_HERE = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not RUN_KERNELS_HERE,
                                   reason="run by test_kernels_under_the_interpreter (child pytest)")
if RUN_KERNELS_HERE:
    from sparse_ofa.kernels import bitmap_int8, block_int8, quantize
    from sparse_ofa.kernels import dequantize as one_launch_dequantize


@pytest.mark.skipif(RUN_KERNELS_HERE, reason="kernels run in this process")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # Everything ran in the child except this very test.
    assert re.match(r"\d+ passed, 1 skipped(, \d+ warnings?)? in ", done.stdout.strip().splitlines()[-1]), done.stdout[-2000:]


BITMAP_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
BLOCK_CFG = {"BLOCK_M": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _reference(x_q, packed):
    return (x_q.double() @ unpack_int8(packed).double().T).to(torch.int32)


def _x(m, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(DEVICE)


def _packed(n, k, sparsity, pattern="unstructured"):
    return pack(sparse_weight(n, k, sparsity, pattern), pattern).to(DEVICE)


def _bitmap_dense(layout, n, k):
    """Rebuild W_q from the bitmap layout with the kernel's own index math, in torch."""
    bits = layout["bits"].cpu()
    kt, _, bytes_per_row = bits.shape
    block_k = bytes_per_row * 8
    kept = ((bits.to(torch.int32).unsqueeze(-1) >> torch.arange(8)) & 1).reshape(kt, n, block_k)
    before = kept.cumsum(-1) - kept
    pos = layout["offsets"].cpu().to(torch.int64).unsqueeze(-1) + before
    vals = layout["values"].cpu()
    w = torch.where(kept.bool(), vals[pos.clamp(max=max(vals.numel() - 1, 0))] if vals.numel() else 0,
                    torch.zeros((), dtype=torch.int8))
    return w.permute(1, 0, 2).reshape(n, kt * block_k)[:, :k]


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("pattern,sparsity,k", [("unstructured", 0.9, 200), ("1x4", 0.75, 96),
                                                ("2:4", 0.5, 64), ("unstructured", 0.0, 40)])
def test_bitmap_layout_rebuilds_weight(pattern, sparsity, k):
    packed = _packed(24, k, sparsity, pattern)
    layout = layouts.bitmap_layout(packed, block_k=32)
    assert layout["bits"].shape == (-(-k // 32), 24, 4)
    assert layout["values"].numel() == int(kept_mask(packed).sum())
    assert torch.equal(_bitmap_dense(layout, 24, k), unpack_int8(packed).cpu())


def test_bitmap_layout_rejects_bad_block():
    with pytest.raises(ValueError, match="multiple of 8"):
        layouts.bitmap_layout(_packed(8, 16, 0.5), block_k=12)


def test_block_layout_lists_exactly_the_nonempty_tiles():
    tiles = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    w = torch.randn(48, 40) * tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:48, :40]
    layout = layouts.block_layout(pack(w), block_n=16, block_k=16)
    assert layout["tile_ptr"].tolist() == [0, 2, 2, 3]
    assert layout["tile_k"].tolist() == [0, 2, 1]
    assert torch.equal(layout["dense"], unpack_int8(pack(w)))
    assert layouts.tile_density(layout, 48, 40, 16, 16) == pytest.approx(3 / 9)


def test_sp24_layout_round_trip_and_valid_metadata():
    w = sparse_weight(16, 64, 0.5, "2:4")
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with a single kept weight
    w[1, 4:8] = 0.0                                   # and one with none
    packed = pack(w, "2:4")
    layout = layouts.sp24_layout(packed)
    assert layout["values"].shape == (16, 32) and layout["meta"].shape == (16, 2)
    assert torch.equal(layouts.sp24_to_dense(layout["values"], layout["meta"]), unpack_int8(packed))
    words = layout["meta"].to(torch.int64) & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    # mma.sp::ordered_metadata accepts only idx0 < idx1.
    assert bool(((nibbles & 3) < (nibbles >> 2)).all())


def test_sp24_layout_rejects_other_patterns():
    with pytest.raises(ValueError, match="'2:4' packed weight"):
        layouts.sp24_layout(_packed(8, 64, 0.9))


# ------------------------------------------------------------------------------------------ bitmap
@pytest.mark.parametrize("m,n,k,sparsity,pattern,split_k", [
    (5, 48, 200, 0.9, "unstructured", 1),
    (5, 48, 200, 0.9, "unstructured", 3),
    (17, 40, 128, 0.5, "unstructured", 1),
    (3, 32, 128, 0.75, "1x4", 2),
    (9, 32, 64, 0.5, "2:4", 1),
])
@needs_kernels
def test_bitmap_kernel_int32_exact(m, n, k, sparsity, pattern, split_k):
    packed = _packed(n, k, sparsity, pattern)
    layout = layouts.bitmap_layout(packed, block_k=64)
    x_q = _x(m, k)
    out = bitmap_int8.bitmap_int8_mm(x_q, layout, n, k, config=BITMAP_CFG, split_k=split_k)
    assert out.dtype == torch.int32
    assert torch.equal(out, _reference(x_q, packed))


@needs_kernels
def test_bitmap_kernel_extreme_values_and_empty_rows():
    w = torch.full((32, 128), 1.0)
    w[::2] = -1.0
    w[3] = 0.0  # a fully pruned output channel
    packed = pack(w).to(DEVICE)
    x_q = torch.full((4, 128), -127, dtype=torch.int8, device=DEVICE)
    out = bitmap_int8.bitmap_int8_mm(x_q, layouts.bitmap_layout(packed, 64), 32, 128, config=BITMAP_CFG,
                                     split_k=1)
    assert torch.equal(out, _reference(x_q, packed))
    assert int(out[0, 0]) == 127 * 127 * 128 and int(out[0, 3]) == 0


@needs_kernels
def test_bitmap_kernel_all_pruned_weight():
    packed = pack(torch.zeros(32, 64)).to(DEVICE)
    out = bitmap_int8.bitmap_int8_mm(_x(3, 64), layouts.bitmap_layout(packed, 64), 32, 64,
                                     config=BITMAP_CFG, split_k=1)
    assert torch.equal(out, torch.zeros(3, 32, dtype=torch.int32, device=DEVICE))


@needs_kernels
@pytest.mark.parametrize("out_dtype,bias", [(torch.float32, True), (torch.float16, False)])
def test_bitmap_kernel_fused_epilogue(out_dtype, bias):
    n, k, m = 40, 128, 6
    packed = _packed(n, k, 0.8)
    x_q = _x(m, k)
    x_scale = torch.rand(m, device=DEVICE) / 100
    x_scale[2] = float("nan")  # a token with non-finite input stays non-finite
    b = torch.randn(n, device=DEVICE) if bias else None
    y = bitmap_int8.bitmap_int8_mm(x_q, layouts.bitmap_layout(packed, 64), n, k, x_scale=x_scale,
                                   w_scale=packed.scale, bias=b, out_dtype=out_dtype,
                                   config=BITMAP_CFG, split_k=1)
    expected = dequantize(_reference(x_q, packed), x_scale, packed.scale, b, out_dtype)
    assert y.dtype == out_dtype
    assert bool(y[2].isnan().all())
    # No FMA contraction in the kernel (NO_FP_FUSION): the same roundings as torch, bit for bit.
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))


@needs_kernels
def test_bitmap_split_k_epilogue_matches_dequantize():
    n, k, m = 32, 192, 4
    packed = _packed(n, k, 0.9)
    x_q, x_scale = _x(m, k), torch.rand(m, device=DEVICE)
    y = bitmap_int8.bitmap_int8_mm(x_q, layouts.bitmap_layout(packed, 64), n, k, x_scale=x_scale,
                                   w_scale=packed.scale, bias=None, out_dtype=torch.float32,
                                   config=BITMAP_CFG, split_k=3)
    assert torch.equal(y, dequantize(_reference(x_q, packed), x_scale, packed.scale, None, torch.float32))


@needs_kernels
@pytest.mark.parametrize("in_dtype,out_dtype,with_bias,split_k", [
    (torch.float32, torch.float32, True, 1), (torch.float16, torch.float16, False, 1),
    (torch.float32, torch.float32, True, 3), (torch.float16, torch.float32, True, 2)])
def test_bitmap_linear_quantizes_inside_and_matches_the_three_step_path(in_dtype, out_dtype, with_bias,
                                                                        split_k):
    n, k, m = 40, 192, 7
    packed = _packed(n, k, 0.85)
    x = (torch.randn(m, k) * 4).to(in_dtype).to(DEVICE)
    x[1] = 0.0
    x[3, 5] = float("nan")
    x[4] = (torch.arange(k) - 95.5).to(in_dtype)  # exact .5 ties
    bias = torch.randn(n, device=DEVICE) if with_bias else None
    y = bitmap_int8.bitmap_int8_linear(x, layouts.bitmap_layout(packed, 64), n, k, w_scale=packed.scale,
                                       bias=bias, out_dtype=out_dtype, config=BITMAP_CFG,
                                       split_k=split_k)
    x_q, x_scale = quantize_per_token(x)
    expected = dequantize(_reference(x_q, packed), x_scale, packed.scale, bias, out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


@needs_kernels
def test_bitmap_linear_rejects_int8_input():
    packed = _packed(32, 64, 0.5)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        bitmap_int8.bitmap_int8_linear(_x(2, 64), layouts.bitmap_layout(packed, 64), 32, 64,
                                       w_scale=packed.scale)


@needs_kernels
def test_bitmap_kernel_default_config_path_exact():
    # No explicit config: autotuned on a GPU, the first config under the interpreter.
    packed = _packed(96, 256, 0.9)
    x_q = _x(300, 256)
    out = bitmap_int8.bitmap_int8_mm(x_q, layouts.bitmap_layout(packed, 128), 96, 256)
    assert torch.equal(out, _reference(x_q, packed))
    packed_block = pack(_block_pruned(128, 192, 64, 0.4)).to(DEVICE)
    out = block_int8.block_int8_mm(x_q[:, :192].contiguous(), layouts.block_layout(packed_block, 64, 64),
                                   128, 192, block_n=64, block_k=64)
    assert torch.equal(out, _reference(x_q[:, :192].contiguous(), packed_block))


@needs_kernels
def test_bitmap_kernel_zero_tokens():
    packed = _packed(32, 64, 0.5)
    out = bitmap_int8.bitmap_int8_mm(_x(0, 64), layouts.bitmap_layout(packed, 64), 32, 64,
                                     config=BITMAP_CFG)
    assert out.shape == (0, 32)


def test_kernels_refuse_problems_past_32_bit_indexing():
    from sparse_ofa.kernels.bitmap_int8 import check_int32_indexing

    check_int32_indexing(4096, 4096, 1024)
    with pytest.raises(ValueError, match="32-bit indexing"):
        check_int32_indexing(2**20, 4096, 1024)


@needs_kernels
@pytest.mark.parametrize("bad,match", [(torch.zeros(2, 64), "int8"), (torch.zeros(2, 32, dtype=torch.int8), r"\[M, 64\]")])
def test_bitmap_kernel_rejects_bad_activations(bad, match):
    packed = _packed(32, 64, 0.5)
    with pytest.raises(ValueError, match=match):
        bitmap_int8.bitmap_int8_mm(bad.to(DEVICE), layouts.bitmap_layout(packed, 64), 32, 64,
                                   config=BITMAP_CFG)


# ------------------------------------------------------------------------------------------ block
def _block_pruned(n, k, tile, keep, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-n // tile), -(-k // tile), generator=gen) < keep
    tiles[0, 0] = True
    mask = tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :k]
    return torch.randn(n, k, generator=gen) * mask


@needs_kernels
@pytest.mark.parametrize("m,n,k,keep", [(37, 80, 96, 0.3), (16, 64, 64, 1.0), (5, 48, 160, 0.5)])
def test_block_kernel_int32_exact(m, n, k, keep):
    packed = pack(_block_pruned(n, k, 32, keep)).to(DEVICE)
    layout = layouts.block_layout(packed, 32, 32)
    x_q = _x(m, k)
    out = block_int8.block_int8_mm(x_q, layout, n, k, block_n=32, block_k=32, config=BLOCK_CFG)
    assert torch.equal(out, _reference(x_q, packed))


@needs_kernels
def test_block_kernel_unstructured_weight_reads_every_tile_and_stays_exact():
    packed = _packed(32, 64, 0.9)
    layout = layouts.block_layout(packed, 32, 32)
    assert layouts.tile_density(layout, 32, 64, 32, 32) == 1.0
    x_q = _x(20, 64)
    out = block_int8.block_int8_mm(x_q, layout, 32, 64, block_n=32, block_k=32, config=BLOCK_CFG)
    assert torch.equal(out, _reference(x_q, packed))


@needs_kernels
def test_block_kernel_fused_epilogue_with_bias():
    n, k, m = 64, 64, 19
    packed = pack(_block_pruned(n, k, 32, 0.5, seed=3)).to(DEVICE)
    x_q, x_scale = _x(m, k), torch.rand(m, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    y = block_int8.block_int8_mm(x_q, layouts.block_layout(packed, 32, 32), n, k, block_n=32,
                                 block_k=32, x_scale=x_scale, w_scale=packed.scale, bias=bias,
                                 out_dtype=torch.float32, config=BLOCK_CFG)
    assert torch.equal(y, dequantize(_reference(x_q, packed), x_scale, packed.scale, bias, torch.float32))


# ------------------------------------------------------------------------------------------ quantize
def _awkward_activations():
    x = torch.randn(8, 300) * 3
    x[1] = 0.0                                       # all-zero token: scale 0, codes 0
    x[2, 5] = float("nan")                           # NaN token: scale NaN, codes 0
    x[3, 7] = float("inf")                           # Inf token
    x[4] = torch.arange(300) - 150.5                 # many exact .5 ties (round half to even)
    x[5] = 0.0
    x[5, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])
    x[6] = 1e-40                                     # subnormal amax: 127 / amax overflows
    return x


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block", [None, 64])
def test_quantize_kernel_bit_identical_to_torch(dtype, block):
    x = _awkward_activations().to(dtype).to(DEVICE)
    x_q, x_scale = quantize.quantize_per_token(x, block)
    ref_q, ref_scale = quantize_per_token(x)
    assert x_q.dtype == torch.int8 and x_scale.dtype == torch.float32
    assert torch.equal(x_q, ref_q)
    assert torch.equal(x_scale.isnan(), ref_scale.isnan())
    assert torch.equal(x_scale.nan_to_num(), ref_scale.nan_to_num())


def _tie_activations(rows=256, seed=0):
    """Row r: x = fp16(a_r * (j + 0.5) / 127) for j < 127, then a_r (the amax). x * 127 / a_r lands
    within an ulp or two of a .5 tie, so inv's last bit decides the rounding: fp32(1 / amax) * 127
    and 127 / amax disagree on many rows. Values on the float16 grid: exact in both test dtypes."""
    gen = torch.Generator().manual_seed(seed)
    amax = (torch.rand(rows, 1, generator=gen) * 8 + 0.01).half().float()
    x = (amax * torch.arange(127).add(0.5) / 127).half().float()
    sign = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, -1.0, 1.0)
    return torch.cat([x, amax], dim=1) * sign


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_kernel_rounds_ties_like_torch(dtype):
    x = _tie_activations().to(dtype).to(DEVICE)
    x_q, x_scale = quantize.quantize_per_token(x)
    ref_q, ref_scale = quantize_per_token(x)
    assert torch.equal(x_q, ref_q)
    assert torch.equal(x_scale, ref_scale)


@needs_kernels
def test_quantize_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize.quantize_per_token(torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        quantize.quantize_per_token(torch.zeros(4, device=DEVICE))


# ------------------------------------------------------------------------------------------ dequantize
@needs_kernels
@pytest.mark.parametrize("out_dtype,with_bias", [(torch.float32, True), (torch.float16, False),
                                                 (torch.float32, False)])
def test_dequantize_kernel_bit_identical_to_torch(out_dtype, with_bias):
    gen = torch.Generator().manual_seed(5)
    acc = torch.randint(-2**24, 2**24, (37, 200), generator=gen, dtype=torch.int32).to(DEVICE)
    x_scale = (torch.rand(37, generator=gen) / 1000).to(DEVICE)
    x_scale[4] = float("nan")
    w_scale = (torch.rand(200, generator=gen) / 100).to(DEVICE)
    bias = torch.randn(200, generator=gen).to(DEVICE) if with_bias else None
    y = one_launch_dequantize.dequantize(acc, x_scale, w_scale, bias, out_dtype)
    expected = dequantize(acc, x_scale, w_scale, bias, out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


@needs_kernels
def test_dequantize_kernel_rejects_float_products():
    with pytest.raises(ValueError, match="int32"):
        one_launch_dequantize.dequantize(torch.zeros(2, 3, device=DEVICE), torch.ones(2, device=DEVICE),
                              torch.ones(3, device=DEVICE), None, torch.float32)


# ------------------------------------------------------------------------------------------ backend
@needs_kernels
@pytest.mark.parametrize("weight,m,route", [("unstructured", 8, "bitmap"), ("tiles", 300, "block"),
                                            ("unstructured", 300, "dense")])
def test_triton_backend_linear_every_route_matches_reference(weight, m, route):
    from sparse_ofa.backends.reference import ReferenceBackend
    from sparse_ofa.backends.triton import TritonBackend
    from sparse_ofa.quant import ActQuant

    w = _block_pruned(128, 192, 64, 0.3) if weight == "tiles" else sparse_weight(128, 192, 0.9)
    packed = pack(w).to(DEVICE)
    backend = TritonBackend()  # driven directly: its registry entry is CUDA-only
    backend.bitmap_max_tokens = 8  # the bitmap route is off by default (measured slower); test it anyway
    prepared = backend.prepare(packed)
    assert backend._route(m, prepared) == route
    x = torch.randn(m, 192, device=DEVICE)
    bias = torch.randn(128, device=DEVICE)
    y = backend.linear(x, prepared, packed.scale, bias, ActQuant(), torch.float32)
    ref = ReferenceBackend()
    expected = ref.linear(x, ref.prepare(packed), packed.scale, bias, ActQuant(), torch.float32)
    assert torch.equal(y, expected)
