"""On a CUDA device: the Triton and CUDA kernels, compiled for the GPU, bit-exact against the reference;
fused epilogues against sparse_ofa.quant.dequantize; dispatch through SparseInt8Linear.
Skipped without CUDA (scripts/gpu_check.sh runs them on the device)."""
import pytest
import torch
from torch import nn

from sparse_ofa import SparseInt8Linear, backends
from sparse_ofa.formats import pack, unpack_int8
from sparse_ofa.quant import dequantize, quantize_per_token
from conftest import sparse_weight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


def _reference(x_q, packed):
    return (x_q.double() @ unpack_int8(packed).double().T).to(torch.int32)


def _x(m, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(DEV)


def _tile_pruned(n, k, tile=64, keep=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-n // tile), -(-k // tile), generator=gen) < keep
    tiles[0, 0] = True
    mask = tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :k]
    return torch.randn(n, k, generator=gen) * mask


# ------------------------------------------------------------------------------------------ Triton
@pytest.mark.parametrize("m", [1, 16, 128, 300])
@pytest.mark.parametrize("n,k", [(768, 768), (200, 320)])
def test_triton_bitmap_autotuned_exact(m, n, k):
    from sparse_ofa.kernels.bitmap_int8 import bitmap_int8_mm
    from sparse_ofa.kernels.layouts import bitmap_layout

    packed = pack(sparse_weight(n, k, 0.9)).to(DEV)
    x_q = _x(m, k)
    out = bitmap_int8_mm(x_q, bitmap_layout(packed, 128), n, k)
    assert torch.equal(out, _reference(x_q, packed))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 200])
def test_triton_bitmap_linear_quantizing_inside_is_bit_identical(out_dtype, m):
    from sparse_ofa.kernels.bitmap_int8 import bitmap_int8_linear
    from sparse_ofa.kernels.layouts import bitmap_layout

    packed = pack(sparse_weight(768, 768, 0.9)).to(DEV)
    x = (torch.randn(m, 768, device=DEV) * 3).to(out_dtype)
    bias = torch.randn(768, device=DEV)
    y = bitmap_int8_linear(x, bitmap_layout(packed, 128), 768, 768, w_scale=packed.scale, bias=bias,
                           out_dtype=out_dtype)
    x_q, x_scale = quantize_per_token(x)
    assert torch.equal(y, dequantize(_reference(x_q, packed), x_scale, packed.scale, bias, out_dtype))


@pytest.mark.parametrize("m", [64, 1000])
def test_triton_block_autotuned_exact(m):
    from sparse_ofa.kernels.block_int8 import block_int8_mm
    from sparse_ofa.kernels.layouts import block_layout

    packed = pack(_tile_pruned(768, 3072)).to(DEV)
    x_q = _x(m, 3072)
    out = block_int8_mm(x_q, block_layout(packed, 64, 64), 768, 3072, block_n=64, block_k=64)
    assert torch.equal(out, _reference(x_q, packed))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [16, 1024])
def test_triton_backend_linear_matches_reference_module(out_dtype, m):
    w = _tile_pruned(512, 768)
    linear = nn.Linear(768, 512).to(DEV)
    with torch.no_grad():
        linear.weight.copy_(w)
    ours = SparseInt8Linear.from_linear(linear, backend="triton")
    ref = SparseInt8Linear.from_linear(linear, backend="reference")
    x = torch.randn(m, 768, device=DEV).to(out_dtype)
    y, y_ref = ours(x), ref(x)
    assert y.dtype == out_dtype
    # Same quantization, exact int32 product, epilogue without FMA contraction: identical bits.
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("m", [8, 1000])
def test_triton_backend_int_mm_exact_on_every_route(m):
    tb = backends.get_backend("triton")
    for w in (_tile_pruned(256, 512), sparse_weight(256, 512, 0.9)):
        packed = pack(w).to(DEV)
        x_q = _x(m, 512)
        assert torch.equal(tb.int_mm(x_q, tb.prepare(packed)), _reference(x_q, packed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 768), (300, 3072), (5, 5000)])
def test_triton_quantize_bit_identical_on_device(dtype, m, k):
    from sparse_ofa.kernels.quantize import quantize_per_token as one_launch

    x = (torch.randn(m, k, device=DEV) * 5).to(dtype)
    if m > 4:
        x[1], x[2, 3], x[3, 9] = 0.0, float("nan"), float("inf")
    x_q, x_scale = one_launch(x)
    ref_q, ref_scale = quantize_per_token(x)
    assert torch.equal(x_q, ref_q)
    assert torch.equal(x_scale.isnan(), ref_scale.isnan())
    assert torch.equal(x_scale.nan_to_num(), ref_scale.nan_to_num())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dequantize_bit_identical_on_device(out_dtype):
    from sparse_ofa.kernels.dequantize import dequantize as one_launch

    acc = torch.randint(-2**24, 2**24, (300, 3072), dtype=torch.int32, device=DEV)
    x_scale, w_scale = torch.rand(300, device=DEV) / 1e3, torch.rand(3072, device=DEV) / 1e2
    bias = torch.randn(3072, device=DEV)
    assert torch.equal(one_launch(acc, x_scale, w_scale, bias, out_dtype),
                       dequantize(acc, x_scale, w_scale, bias, out_dtype))


# ------------------------------------------------------------------------------------------ CUDA 2:4
@pytest.fixture(scope="module")
def cuda24():
    ok, why = backends.availability("cuda")
    if not ok:
        pytest.fail(f"the CUDA backend should work on this GPU: {why}")
    return backends.get_backend("cuda")


def test_cuda_metadata_mode_was_found(cuda24):
    assert cuda24.meta_mode in (0, 1)


@pytest.mark.parametrize("m", [1, 64, 77, 300, 4096])
@pytest.mark.parametrize("n,k", [(768, 768), (200, 128), (3072, 768)])
def test_cuda_sp24_int_mm_exact(cuda24, m, n, k):
    packed = pack(sparse_weight(n, k, 0.5, "2:4"), "2:4").to(DEV)
    x_q = _x(m, k)
    assert torch.equal(cuda24.int_mm(x_q, cuda24.prepare(packed)), _reference(x_q, packed))


def test_cuda_sp24_extremes(cuda24):
    w = torch.zeros(128, 256)
    w[:, 0::4], w[:, 3::4] = 1.0, -1.0
    packed = pack(w, "2:4").to(DEV)
    x_q = torch.full((70, 256), 127, dtype=torch.int8, device=DEV)
    x_q[1] = -127
    assert torch.equal(cuda24.int_mm(x_q, cuda24.prepare(packed)), _reference(x_q, packed))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_sp24_fused_epilogue_bit_exact(cuda24, out_dtype, with_bias):
    n, k, m = 384, 768, 333
    packed = pack(sparse_weight(n, k, 0.5, "2:4"), "2:4").to(DEV)
    x = torch.randn(m, k, device=DEV)
    x[5] = float("nan")
    x_q, x_scale = quantize_per_token(x)
    bias = torch.randn(n, device=DEV) if with_bias else None
    prepared = cuda24.prepare(packed)
    y = torch.ops.sparse_ofa.cuda_sp24_linear(x_q, prepared["values"], prepared["meta"], x_scale,
                                              packed.scale, bias, n, cuda24.meta_mode, out_dtype)
    expected = dequantize(_reference(x_q, packed), x_scale, packed.scale, bias, out_dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))


def test_cuda_sp24_rejects_bad_inputs(cuda24):
    packed = pack(sparse_weight(128, 128, 0.5, "2:4"), "2:4").to(DEV)
    prepared = cuda24.prepare(packed)
    with pytest.raises(RuntimeError, match="CUDA device"):
        torch.ops.sparse_ofa.cuda_sp24_int_mm(_x(4, 128).cpu(), prepared["values"], prepared["meta"],
                                              128, cuda24.meta_mode)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.sparse_ofa.cuda_sp24_int_mm(_x(4, 128).float(), prepared["values"],
                                              prepared["meta"], 128, cuda24.meta_mode)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.sparse_ofa.cuda_sp24_int_mm(_x(4, 96), prepared["values"], prepared["meta"], 128,
                                              cuda24.meta_mode)


def test_cuda_sp24_ops_pass_opcheck(cuda24):
    packed = pack(sparse_weight(128, 128, 0.5, "2:4"), "2:4").to(DEV)
    prepared = cuda24.prepare(packed)
    x_q, x_scale = quantize_per_token(torch.randn(32, 128, device=DEV))
    torch.library.opcheck(torch.ops.sparse_ofa.cuda_sp24_int_mm,
                          (x_q, prepared["values"], prepared["meta"], 128, cuda24.meta_mode))
    torch.library.opcheck(torch.ops.sparse_ofa.cuda_sp24_linear,
                          (x_q, prepared["values"], prepared["meta"], x_scale, packed.scale, None, 128,
                           cuda24.meta_mode, torch.float16))


# ------------------------------------------------------------------------------------------ dispatch
def test_auto_dispatch_by_tokens_and_pattern(cuda24):
    def module(w):
        linear = nn.Linear(w.shape[1], w.shape[0]).to(DEV)
        with torch.no_grad():
            linear.weight.copy_(w)
        return SparseInt8Linear.from_linear(linear)

    two_four = module(sparse_weight(768, 768, 0.5, "2:4"))
    assert two_four.dispatch(4096) == "triton"  # Triton's dense/block routes beat the 2:4 kernel
    assert two_four.dispatch(16) == "triton"
    unstructured = module(sparse_weight(768, 768, 0.9))
    assert unstructured.dispatch(16) == "triton"
    dense = module(torch.randn(768, 768))
    assert dense.dispatch(16) == "dense"
    x = torch.randn(4096, 768, device=DEV)
    ref = SparseInt8Linear.from_linear(nn.Linear(768, 768), backend="reference")
    ref.load_state_dict(two_four.state_dict())
    torch.testing.assert_close(two_four(x), ref.to(DEV)(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ numerics
def test_reference_quantizers_round_alike_on_cpu_and_cuda():
    """quant.py / formats.py are the spec: the same bits on every device (CUDA turns `t / 127.0`
    into t * fp32(1 / 127), which is why they divide by a device tensor)."""
    from sparse_ofa.formats import quantize_weight
    from test_triton_kernels import _tie_activations

    for x in (_tie_activations(), torch.randn(300, 3072) * 5, (torch.randn(64, 768) * 3).half().float()):
        q_cpu, s_cpu = quantize_per_token(x)
        q_gpu, s_gpu = quantize_per_token(x.to(DEV))
        assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        w_cpu, ws_cpu = quantize_weight(x)
        w_gpu, ws_gpu = quantize_weight(x.to(DEV))
        assert torch.equal(w_gpu.cpu(), w_cpu) and torch.equal(ws_gpu.cpu(), ws_cpu)
