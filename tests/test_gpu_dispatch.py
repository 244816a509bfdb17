"""GPU backends without a GPU: availability reasons, dispatch rules and derived layouts (all CPU)."""
import pytest
import torch

from sparse_ofa import backends
from sparse_ofa.backends import cuda as cuda_backend
from sparse_ofa.backends import triton as triton_backend
from sparse_ofa.backends.base import LayerInfo
from sparse_ofa.formats import pack, unpack_int8
from sparse_ofa.kernels.layouts import sp24_to_dense
from conftest import sparse_weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_backends_unavailable_without_cuda_with_reason(name):
    ok, why = backends.availability(name)
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match=name):
        backends.get_backend(name)


def test_gpu_backends_stay_out_of_cpu_chains():
    info = LayerInfo(64, 64, "2:4", 0.5)
    chain = backends.resolve("auto", torch.device("cpu"), info)
    assert not {"triton", "cuda"} & {b.name for b in chain}


def test_triton_prefers_sparse_layers_only():
    tb = triton_backend.TritonBackend()
    assert tb.prefers(16, LayerInfo(768, 768, "unstructured", 0.1))
    assert tb.prefers(4096, LayerInfo(768, 768, "unstructured", 0.1))
    assert not tb.prefers(16, LayerInfo(768, 768, "unstructured", 0.9))
    assert tb.supports(torch.device("cuda"), LayerInfo(8, 8, "1x4", 0.5))
    assert not tb.supports(torch.device("cpu"), LayerInfo(8, 8, "1x4", 0.5))


def _tile_pruned(n, k, keep_every):
    tiles = torch.zeros(n // 64, k // 64, dtype=torch.bool)
    tiles.view(-1)[::keep_every] = True
    return torch.randn(n, k) * tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)


def test_triton_routes_by_tokens_and_tile_density():
    tb = triton_backend.TritonBackend()
    block = tb.prepare(pack(_tile_pruned(256, 256, 10)))
    scattered = tb.prepare(pack(sparse_weight(256, 256, 0.9)))
    # bitmap route off by default (H200: slower than dense/block at 8-128 tokens), block from 1 token
    assert tb.bitmap_max_tokens == triton_backend.SMALL_M == 0
    assert tb._route(1, block) == "block"
    tb.bitmap_max_tokens = 16
    assert tb._route(1, block) == tb._route(16, block) == "bitmap"
    assert tb._route(17, block) == "block"
    # 90 % unstructured leaves no 64x64 tile empty: tensor cores must do all the work -> dense.
    assert tb._route(4096, scattered) == "dense"
    tb.max_tile_density = 1.0  # the device experiment: every layer through the block kernel
    assert tb._route(4096, scattered) == "block" and float(scattered["tile_density"]) == 1.0
    tb.max_tile_density = 0.05  # and the other way: 2 of 16 tiles are too many now
    assert tb._route(4096, block) == "dense" and float(block["tile_density"]) == 2 / 16  # tiles 0 and 10 of 16
    assert scattered["bitmap_values"].numel() == pack(sparse_weight(256, 256, 0.9)).nnz


def test_triton_dense_route_is_exact_on_cpu_tensors():
    tb = triton_backend.TritonBackend()
    packed = pack(sparse_weight(64, 128, 0.9))
    prepared = tb.prepare(packed)
    x_q = torch.randint(-127, 128, (triton_backend.SMALL_M + 44, 128), dtype=torch.int8)
    out = tb.int_mm(x_q, prepared)
    assert torch.equal(out, (x_q.double() @ unpack_int8(packed).double().T).to(torch.int32))


def test_cuda_backend_serves_large_m_2_4_only():
    cb = cuda_backend.CudaBackend()
    dev = torch.device("cuda")
    assert cb.supports(dev, LayerInfo(768, 768, "2:4", 0.5))
    assert not cb.supports(dev, LayerInfo(768, 768, "unstructured", 0.5))
    assert not cb.supports(dev, LayerInfo(768, 96, "2:4", 0.5))  # K % 64 != 0
    assert not cb.supports(torch.device("cpu"), LayerInfo(768, 768, "2:4", 0.5))
    assert cb.prefers(4096, LayerInfo(768, 768, "2:4", 0.5))
    assert not cb.prefers(16, LayerInfo(768, 768, "2:4", 0.5))


def test_sp24_prepare_pads_rows_with_harmless_metadata():
    packed = pack(sparse_weight(200, 128, 0.5, "2:4"), "2:4")
    prepared = cuda_backend.prepare_sp24(packed)
    assert prepared["values"].shape == (256, 64) and prepared["meta"].shape == (256, 4)
    assert int(prepared["n"]) == 200
    assert torch.equal(prepared["values"][200:], torch.zeros(56, 64, dtype=torch.int8))
    assert bool((prepared["meta"][200:] == 0x44444444).all())
    assert torch.equal(sp24_to_dense(prepared["values"][:200], prepared["meta"][:200]),
                       unpack_int8(packed))
