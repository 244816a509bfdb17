"""The feed-forward block of a transformer layer, two SparseInt8Linear with GELU between, as one call:

    out = LayerNorm(second(GELU(first(x))) + residual)        (residual and LayerNorm optional)

On the cpu backend (AVX-512; AVX2 / AVX-VNNI from 32 tokens) this is ONE op, cpu_ffn: each thread
keeps its 64-token tiles of the intermediate (M x 3072 for BERT-base, the layer's largest activation)
channel-major in its own cache instead of writing it out row-major and reading it back
(csrc/cpu_ffn.cpp). Same int8 values, int32 sums and epilogue arithmetic as the two calls
`second.direct(first.direct(x, gelu=True), residual=..., norm=...)`, so the same output bit for bit;
that composition is what runs on every other backend. The fast path's lean layer calls this.
"""
from __future__ import annotations

import torch

from .. import backends as _backends
from ..modules import SparseInt8Linear, needs_autograd


def feed_forward(first: SparseInt8Linear, second: SparseInt8Linear, x: torch.Tensor,
                 residual: torch.Tensor | None = None, norm: tuple | None = None,
                 gelu: bool = True) -> torch.Tensor:
    """LayerNorm(second(act(first(x))) + residual), act = GELU (erf form) if `gelu` else identity;
    norm = (weight, bias, eps) of the LayerNorm over second's output features, or None.

    Like SparseInt8Linear.direct, the kernel arguments for x's token count are resolved on the first
    call and cached in both modules' caches: rebuilding either one's layouts drops it, and a plan is
    used only while both caches hold it (so a reused id of `second` cannot pick up a stale one)."""
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and needs_autograd(x, residual, norm):
        # autograd must see it: the two layers' direct() calls carry the input gradients
        return second.direct(first.direct(x, gelu=gelu), residual=residual, norm=norm)
    post = (residual is not None, norm is not None)
    key = ("ffn", id(second), x.shape, x.dtype, x.device, _backends.plan_context(), gelu, post)
    fn = first.cached_plan(key)
    if fn is None or second.cached_plan(key) is not fn:
        if first.out_features != second.in_features:
            raise ValueError(f"feed_forward: first has {first.out_features} output features but second "
                             f"takes {second.in_features}")
        fn = _plan(first, second, x, gelu, post)
        first.remember_plan(key, fn)
        second.remember_plan(key, fn)
    return fn(x, residual, norm)


def _plan(first: SparseInt8Linear, second: SparseInt8Linear, x: torch.Tensor, gelu: bool,
          post: tuple[bool, bool]):
    if (x.dim() == 0 or x.shape[-1] != first.in_features or x.dtype not in (torch.float32, torch.bfloat16,
                                                                            torch.float16)
            or x.device != first.weight_values.device):
        first.forward(x)  # raises the error that names the problem
    m = x.numel() // first.in_features
    b1, args1 = first.kernel_args(m)
    b2, args2 = second.kernel_args(m)
    fn = None
    if b1.name == b2.name and x.dtype == torch.float32 and second.weight_values.device == x.device:
        fn = b1.ffn_fn(args1, args2, m, gelu, post)
    if fn is not None:
        return fn

    def composed(x, residual, norm):
        return second.direct(first.direct(x, gelu=gelu), residual=residual, norm=norm)
    return composed
