"""What a backend is: a derived layout built once from the packed weight, an exact int32 product,
and a fused linear (quantize -> product -> dequantize + bias). Subclasses override what they fuse."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import PackedWeight
from ..quant import ActQuant, dequantize, quantize_activations


@dataclass(frozen=True)
class LayerInfo:
    """Plain-int facts about one packed weight, cached by the module so dispatch never syncs."""

    out_features: int
    in_features: int
    pattern: str
    density: float

    @classmethod
    def of(cls, packed: PackedWeight) -> "LayerInfo":
        return cls(packed.out_features, packed.in_features, packed.pattern, packed.density)


class Backend:
    name = ""
    device_types: tuple[str, ...] = ("cpu", "cuda")

    def availability(self) -> tuple[bool, str]:
        """(usable here, why not). Cheap after the first call."""
        return True, ""

    def supports(self, device: torch.device, info: LayerInfo) -> bool:
        return device.type in self.device_types

    def prefers(self, m: int, info: LayerInfo) -> bool:
        """Under backend="auto": is this backend expected to beat dense INT8 for M tokens?"""
        return True

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        """Derived layout, built once per module (and again after a device move)."""
        raise NotImplementedError

    def int_mm(self, x_q: torch.Tensor, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Exact int32 [M, N] = x_q [M, K] int8 @ W_q^T."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant, out_dtype: torch.dtype) -> torch.Tensor:
        """y [M, N] = dequantize(int_mm(quantize(x))) + bias; x is a contiguous 2-D float tensor."""
        x_q, x_scale = quantize_activations(x, act)
        return dequantize(self.int_mm(x_q, prepared), x_scale, w_scale, bias, out_dtype)

    def linear_fn(self, prepared: dict[str, torch.Tensor], w_scale: torch.Tensor, bias: torch.Tensor | None,
                  act: ActQuant, m: int, out_dtype: torch.dtype, post: tuple[bool, bool, bool]):
        """Optional: fn(x [..., K], residual [..., N], norm) -> [..., N], linear(x, ...) for m tokens
        (m = x.numel() // K), with the post-ops
        `post` = (+ residual, GELU, LayerNorm(norm = (weight, bias, eps))) applied in that order, for
        backends that do this in one op (SparseInt8Linear.direct caches it). None: not offered."""
        return None

    def ffn_fn(self, first: tuple, second: tuple, m: int, gelu: bool, post: tuple[bool, bool]):
        """Optional: fn(x [..., K], residual [..., N], norm) -> [..., N], the feed-forward block
        LayerNorm(second(GELU(first(x))) + residual) of two layers run by this backend, as one op
        (sparse_ofa.ffn caches it). first / second = (prepared, w_scale, bias, act) as linear_fn takes
        them; gelu: GELU (erf) between the two, else nothing; post = (+ residual, LayerNorm).
        None: not offered (the caller composes two linear_fn calls)."""
        return None

    def qkv_attention_fn(self, prepared: dict[str, torch.Tensor], w_scale: torch.Tensor, bias: torch.Tensor | None,
                         act: ActQuant, m: int, heads: int, scale: float, bf16: bool = False):
        """Optional: fn(x [B, S, K], mask) -> [B, S, H], fp32 attention (sparse_ofa.fastpath) of the
        fused QKV projection of x by this layer ([3H, K]: q | k | v), as one op; bf16: both attention
        products on bf16 inputs (fp32 sums, softmax). None: not offered."""
        return None

    def attention_runs(self, x: torch.Tensor, mask) -> bool:
        """Optional: whether `attention` takes a fused q|k|v shaped and typed like x ([B, S, 3H] on one
        of this backend's devices) with this mask (None, bool or additive, broadcastable to
        [B, heads, S, S]). False (the default): not offered; the fast path runs torch's SDPA."""
        return False

    def attention(self, qkv: torch.Tensor, mask, heads: int, scale: float, bf16: bool = False) -> torch.Tensor:
        """Attention of a fused q|k|v [B, S, 3H] (`heads` heads of H / heads channels; scores scaled
        by `scale`, softmax in fp32) -> [B, S, H] with the heads merged; bf16: both products on bf16
        inputs where `bf16_attention()`. Called only where attention_runs(qkv, mask)."""
        raise NotImplementedError

    def bf16_attention(self) -> bool:
        """Whether attention(bf16=True) runs its products in bf16 here (else it runs them in fp32)."""
        return False

    def __repr__(self) -> str:
        return f"<sparse_ofa backend {self.name!r}>"
