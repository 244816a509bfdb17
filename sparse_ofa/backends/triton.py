"""The Triton backend (CUDA tensors): sparse INT8 matmuls from kernels/, chosen by token count.

Dispatch inside the backend, per forward of M tokens (the weight's facts are fixed at prepare time):
    M <= bitmap_max_tokens            bitmap "load as sparse" kernel: memory-bound, moves ~0.26 B per
                                      weight at 90 % sparsity instead of 1 B (kernels/bitmap_int8.py);
                                      dynamic activation quantization runs inside it (one launch)
    tile density <= T                 block-sparse kernel skipping empty 64x64 tiles (block_int8.py)
    otherwise                         dense INT8 (torch._int_mm, cuBLASLt) on the dense copy the block
                                      layout keeps anyway: unstructured sparsity cannot skip tensor-core
                                      work, so dense is the fastest exact product there
`prefers` (backend="auto") takes layers of density <= MAX_DENSITY; denser layers go to the dense
backend. bitmap_max_tokens defaults to SMALL_M = 0, i.e. the bitmap route is off: on an H200
(bench/NOTES.md "GPU kernels", BERT-base/large shapes) the bitmap layer lost to the dense route at
8, 16 and 128 tokens (10-90 % slower), and the block route won from 16 tokens on. Set
`sparse_ofa.backends.get_backend("triton").bitmap_max_tokens = N` where a GPU measures otherwise.
T is `max_tile_density` (MAX_TILE_DENSITY = 0.6), also settable per backend object: 1.0 runs every
layer through the block kernel (the dense route's product and epilogue as one launch, not two), the
first experiment bench/NOTES.md lists for a device session.
"""
from __future__ import annotations

import torch

from ..formats import PackedWeight
from .base import Backend, LayerInfo
from .int8 import dequantize_output, int_mm, quantize_input

SMALL_M = 0  # default bitmap_max_tokens: measured, see the module docstring
MAX_DENSITY = 0.5
MAX_TILE_DENSITY = 0.6
BITMAP_BLOCK_K = 128
TILE_N, TILE_K = 64, 64


def _kernels():
    # Imported on first use, so that importing this backend never imports Triton.
    from sparse_ofa.kernels import bitmap_int8, block_int8, layouts

    return bitmap_int8, block_int8, layouts


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda",)
    bitmap_max_tokens = SMALL_M
    max_tile_density = MAX_TILE_DENSITY

    def availability(self):
        if not torch.cuda.is_available():
            return False, "needs a CUDA device (torch.cuda.is_available() is False)"
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
            return False, f"triton cannot be imported: {exc}"
        return True, ""

    def supports(self, device, info: LayerInfo):
        return device.type == "cuda"

    def prefers(self, m: int, info: LayerInfo) -> bool:
        return info.density <= MAX_DENSITY

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        _, _, layouts = _kernels()
        n, k = packed.shape
        bitmap = layouts.bitmap_layout(packed, BITMAP_BLOCK_K)
        block = layouts.block_layout(packed, TILE_N, TILE_K)
        density = layouts.tile_density(block, n, k, TILE_N, TILE_K)
        prepared = {f"bitmap_{key}": v for key, v in bitmap.items()}
        prepared.update({f"block_{key}": v for key, v in block.items()})
        # On the CPU, so routing never waits on the GPU.
        prepared["tile_density"] = torch.tensor(density, dtype=torch.float64)
        return prepared

    def _route(self, m: int, prepared) -> str:
        if m <= self.bitmap_max_tokens:
            return "bitmap"
        return "block" if float(prepared["tile_density"]) <= self.max_tile_density else "dense"

    def _run(self, x_q, prepared, **epilogue):
        bitmap_int8, block_int8, _ = _kernels()
        n, k = prepared["block_dense"].shape
        route = self._route(x_q.shape[0], prepared)
        if route == "bitmap":
            layout = {key[7:]: v for key, v in prepared.items() if key.startswith("bitmap_")}
            return bitmap_int8.bitmap_int8_mm(x_q, layout, n, k, **epilogue)
        if route == "block":
            layout = {key[6:]: v for key, v in prepared.items() if key.startswith("block_")}
            return block_int8.block_int8_mm(x_q, layout, n, k, block_n=TILE_N, block_k=TILE_K,
                                            **epilogue)
        acc = int_mm(x_q, prepared["block_dense"].t())
        return dequantize_output(acc, **epilogue) if epilogue else acc

    def int_mm(self, x_q, prepared):
        return self._run(x_q.contiguous(), prepared)

    def linear(self, x, prepared, w_scale, bias, act, out_dtype):
        bias = None if bias is None else bias.to(torch.float32)
        if not act.is_static and self._route(x.shape[0], prepared) == "bitmap":
            # Few tokens: quantization runs inside the bitmap kernel, the layer is one launch.
            bitmap_int8, _, _ = _kernels()
            n, k = prepared["block_dense"].shape
            layout = {key[7:]: v for key, v in prepared.items() if key.startswith("bitmap_")}
            return bitmap_int8.bitmap_int8_linear(x, layout, n, k, w_scale=w_scale, bias=bias,
                                                  out_dtype=out_dtype)
        x_q, x_scale = quantize_input(x, act)
        return self._run(x_q, prepared, x_scale=x_scale, w_scale=w_scale, bias=bias,
                         out_dtype=out_dtype)
