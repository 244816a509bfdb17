"""Fast self-attention for BERT-style and DistilBERT attention modules ("sdpa" attention in HF):
fused QKV (qkv.py), then attention reading q/k/v straight from the fused output.

* The attention kernel comes through the backend interface (`backends.attention_backend`): where a
  backend offers one for the input (the cpu backend: on AVX-512 csrc/cpu/attention_avx512.cpp, ~2.5x
  torch's SDPA at 128 tokens; on AVX2 / AVX-VNNI attention_avx2.cpp up to 128 keys, where it is as
  fast or faster; heads written merged), it runs; elsewhere
  `F.scaled_dot_product_attention` on views of the fused output (no HF attention-interface dispatch,
  no copies of q/k/v). Both are fp32 and differ from the plain path only in summation order (~1e-6).
  `attention="sdpa"` keeps torch's kernel. Where the fused layer's own backend offers projection +
  attention as one op (`Backend.qkv_attention_fn`: cpu_qkv_attention, the projection written
  channel-major, K^T read in place), that runs instead, with the same bits as the two ops.
* Optional bf16 attention (`attention="bf16"`, off by default): QK^T and PV on bf16 inputs with fp32
  sums and an fp32 softmax; changes numerics slightly (about as much as the int8 rounding of the
  linears), hence opt-in. Where the attention backend runs bf16 products (`bf16_attention()`: AVX-512
  BF16, csrc/cpu/attention_bf16.cpp, ~1.5x the fp32 kernel at 128 tokens), from BF16_MIN_KEYS keys on;
  shorter sequences there run the fp32 kernel (faster); other CPUs torch ops in bfloat16.

The fast forward steps aside, running the module's own forward, while training, under
torch.compile/export tracing, with a KV cache, or when attention weights are asked for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends as _backends
from ..modules import SparseInt8Linear
from .guards import FastMixin, lean_or_own, own_forward_arguments, uses_cache
from .qkv import QKV_NAMES, fused_qkv

ATTENTION_MODES = ("fp32", "sdpa", "bf16")
BF16_MIN_KEYS = 32  # below, converting q/k/v to bf16 pairs costs what the bf16 products save (bench/NOTES.md)
_NO_PLAN = object()


def _bf16_attention(qkv: torch.Tensor, heads: int, mask) -> torch.Tensor:
    """Attention of a fused fp32 qkv [B, S, 3H] (q already scaled) with both products in bf16
    (AVX-512 BF16) and the softmax accumulated in fp32; returns fp32 [B, S, H].

    One copy casts and lays q, k, v out as contiguous [B, heads, S, D] (matmul on the strided
    views copies anyway, three times); an additive mask is added in fp32 so it stays finite."""
    b, s, three_h = qkv.shape
    d = three_h // (3 * heads)
    split = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = torch.empty(split.shape, dtype=torch.bfloat16, device=qkv.device).copy_(split).unbind(0)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if mask is not None and mask.dtype != torch.bool:
        probs = scores.float().add_(mask).softmax(-1)
    else:
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, -1, dtype=torch.float32)
    out = torch.matmul(probs.to(torch.bfloat16), v)  # [B, heads, S, D]
    merged = torch.empty(b, s, heads, d, dtype=qkv.dtype, device=qkv.device).copy_(out.transpose(1, 2))
    return merged.view(b, s, heads * d)


def _qkv_attention_plan(fused: SparseInt8Linear, x: torch.Tensor, heads: int, scale: float, bf16: bool):
    """fn(x, mask) running the fused projection + attention as one op (the backend's
    qkv_attention_fn), or None; resolved once per input shape and cached with the layer's call plans."""
    key = ("qkv_attention", x.shape, x.dtype, x.device, _backends.plan_context(), heads, scale, bf16)
    fn = fused.cached_plan(key)
    if fn is None:
        m = x.numel() // fused.in_features
        backend, args = fused.kernel_args(m)
        fn = fused.remember_plan(key, backend.qkv_attention_fn(*args, m, heads, scale, bf16=bf16) or _NO_PLAN)
    return None if fn is _NO_PLAN else fn


class FastSelfAttentionMixin(FastMixin):
    """Mixed in front of a BERT-style SelfAttention class (see install.apply_fastpath)."""

    _sparse_ofa_attention = "fp32"
    _qkv_names = QKV_NAMES[0]

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if (self.training or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or kwargs.get("output_attentions") or uses_cache(args, kwargs)
                or self.__dict__.get("_sparse_ofa_attention_mode") == "off"):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)

        def own():
            return super(FastSelfAttentionMixin, self).forward(hidden_states, attention_mask, *args, **kwargs)

        def lean():
            out = self.fast_attention(hidden_states, attention_mask)
            return own() if out is None else (self.project_output(out), None)
        return lean_or_own(self, "_sparse_ofa_attention_mode", lean, own)

    def project_output(self, out: torch.Tensor) -> torch.Tensor:
        """What the module's own forward applies after the attention: nothing for BERT-style modules
        (the layer's attention.output holds the projection)."""
        return out

    def fast_attention(self, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor | None:
        """The attention output [..., S, H] by fused QKV, or None where the model's forward must run
        (not "sdpa" attention, q/k/v no longer fusable, or turned off). The lean layer calls this directly."""
        if (getattr(self.config, "_attn_implementation", None) != "sdpa"
                or self.__dict__.get("_sparse_ofa_attention_mode") == "off"):
            return None
        fused = fused_qkv(self)
        if fused is None:
            return None
        scale = getattr(self, "scaling", self.attention_head_size ** -0.5)
        mode = self._sparse_ofa_attention
        heads = self.num_attention_heads
        kernel = None if mode == "sdpa" else _backends.attention_backend(hidden_states, attention_mask)
        if kernel is not None:  # (qkv has hidden_states' dtype, device and rank: the check holds for both)
            bf16 = mode == "bf16" and hidden_states.shape[-2] >= BF16_MIN_KEYS and kernel.bf16_attention()
            fn = _qkv_attention_plan(fused, hidden_states, heads, scale, bf16)
            if fn is not None:  # projection + attention as one op (same bits as the two below)
                return fn(hidden_states, attention_mask)
            return kernel.attention(fused.direct(hidden_states), attention_mask, heads, scale, bf16)
        qkv = fused.direct(hidden_states)
        if mode == "bf16" and qkv.device.type == "cpu" and qkv.dim() == 3 and qkv.dtype == torch.float32:
            qkv[..., :self.all_head_size].mul_(scale)  # qkv is ours: fold the scale into q
            return _bf16_attention(qkv, heads, attention_mask)
        input_shape = hidden_states.shape[:-1]
        head_shape = (*input_shape, -1, self.attention_head_size)
        q, k, v = (t.view(head_shape).transpose(-3, -2) for t in qkv.split(self.all_head_size, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale)
        return out.transpose(-3, -2).reshape(*input_shape, -1)


class FastDistilSelfAttentionMixin(FastSelfAttentionMixin):
    """Mixed in front of DistilBERT's self-attention (transformers 5: DistilBertSelfAttention), which
    names its projections q_lin/k_lin/v_lin, its head count n_heads and applies its output projection
    out_lin itself."""

    _qkv_names = QKV_NAMES[1]
    num_attention_heads = property(lambda self: self.n_heads)
    all_head_size = property(lambda self: self.dim)

    def project_output(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_lin(out)


def attention_mixin(module: nn.Module) -> type | None:
    """The fast-path mixin for a BERT-style or DistilBERT self-attention module, None for others."""
    name = type(module).__name__
    if (not name.endswith("SelfAttention") or "Cross" in name or getattr(module, "is_decoder", False)
            or getattr(module, "is_causal", False) or not hasattr(module, "config")):
        return None
    if all(hasattr(module, a) for a in ("query", "key", "value", "attention_head_size", "all_head_size")):
        return FastSelfAttentionMixin
    # DistilBERT: only transformers 5's form, forward(hidden_states, attention_mask, ...) -> (out, weights);
    # transformers 4's MultiHeadSelfAttention takes (query, key, value, mask, ...) and is left alone.
    if (all(hasattr(module, a) for a in ("q_lin", "k_lin", "v_lin", "out_lin", "n_heads", "dim",
                                         "attention_head_size", "scaling"))
            and own_forward_arguments(module)[:2] == ("hidden_states", "attention_mask")):
        return FastDistilSelfAttentionMixin
    return None
