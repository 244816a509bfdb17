"""The `cpu` backend: sparse-INT8 kernels in C++ (csrc/cpu/), as torch.ops.sparse_ofa.cpu_*.

prepare() derives both quad layouts (layouts.py; aligned quads only for 1x4 weights) and each call
takes the cheaper one for its token count (`choose`). The fused linear quantizes activations per
token (or with the static QAT scale) exactly as sparse_ofa/quant.py does, multiplies with vpdpbusd
(AVX-512 VNNI / AVX-VNNI), an exact vpmaddwd form (AVX2) or plain C++ (any CPU), and applies the
epilogue (x_scale * w_scale, bias, fp32/bf16) and the optional post-ops in the kernel. Whether auto
picks it for a layer: dispatch.py. The fused FFN, QKV + attention and attention ops run on AVX-512
and the 256-bit paths, where dispatch.py's runs_ffn_op / runs_attention_op say they are faster.
"""
from __future__ import annotations

import torch

from ...formats import PackedWeight
from ...quant import ActQuant
from ..base import Backend, LayerInfo
from .dispatch import layout_costs, layout_steps, runs_attention_op, runs_ffn_op, runs_gathered, sparse_preferred
from .layouts import MAX_QUAD_CHANNELS, derive_gathered, derive_quads
from .ops import (EXTENSION, ISAS, best_isa, bf16_attention_supported, effective_isa, fuses_post_ops, isa_code, load,
                  post_op_fn)


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def availability(self) -> tuple[bool, str]:
        try:
            load()
        except Exception as exc:  # no compiler, compile error...: unavailable, with the reason
            return False, f"C++ extension {EXTENSION} did not build/load: {type(exc).__name__}: {exc}"
        return True, ""

    def supports(self, device: torch.device, info: LayerInfo) -> bool:
        return device.type == "cpu" and info.in_features <= MAX_QUAD_CHANNELS

    def prefers(self, m: int, info: LayerInfo) -> bool:
        return sparse_preferred(m, info)

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        """Aligned quads always; gathered quads too for unstructured / 2:4 weights (chosen per call)."""
        prepared = {"q_" + key: t for key, t in derive_quads(packed).items()}
        if packed.pattern != "1x4":
            prepared.update({"g_" + key: t for key, t in derive_gathered(packed).items()})
        return prepared

    @staticmethod
    def choose(m: int, prepared: dict[str, torch.Tensor], isa: int | None = None) -> tuple[torch.Tensor, ...]:
        """The op arguments of the cheaper layout for m tokens (gathered quads have AVX-512 and
        AVX2 / AVX-VNNI kernels; the portable path runs them with its scalar loop, so it keeps aligned
        quads). isa: the op's ISA code if the caller has it (-1 = best), else read like effective_isa()."""
        n_quads = prepared["q_quad_w"].numel()
        n_gathered = prepared["g_quad_w"].numel() if "g_quad_w" in prepared else None
        eff = effective_isa() if isa is None else (ISAS[best_isa()] if isa < 0 else isa)
        if n_gathered is not None and not runs_gathered(eff):
            n_gathered = None
        aligned, gathered = layout_costs(m, n_quads, n_gathered, layout_steps(eff))
        p = "g_" if gathered < aligned else "q_"
        return tuple(prepared[p + key] for key in ("quad_w", "quad_k", "row_ptr", "rowsum", "layout"))

    @staticmethod
    def _args(prepared):
        """Op arguments of a layout dict from derive_quads / derive_gathered."""
        return (prepared["quad_w"], prepared["quad_k"], prepared["row_ptr"], prepared["rowsum"],
                prepared["layout"])

    def int_mm(self, x_q: torch.Tensor, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        isa = isa_code()
        return torch.ops.sparse_ofa.cpu_int_mm(x_q, *self.choose(x_q.shape[0], prepared, isa), isa)

    def linear(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant, out_dtype: torch.dtype) -> torch.Tensor:
        isa = isa_code()
        return torch.ops.sparse_ofa.cpu_linear(x, *self.choose(x.shape[0], prepared, isa), w_scale, bias,
                                               *act.kernel_args(), out_dtype, isa)

    def linear_fn(self, prepared, w_scale, bias, act, m, out_dtype, post):
        # the op takes x [..., K] and returns [..., N] itself (no reshapes from Python)
        isa = isa_code()
        if not fuses_post_ops(isa, out_dtype, post):
            return None
        args = (*self.choose(m, prepared, isa), w_scale, bias, *act.kernel_args(), out_dtype, isa)
        return post_op_fn(torch.ops.sparse_ofa.cpu_linear.default, args, post)

    def qkv_attention_fn(self, prepared, w_scale, bias, act, m, heads, scale, bf16=False):
        # one cpu_qkv_attention op: the projection channel-major, K^T read in place (csrc/cpu_attention.cpp)
        isa = isa_code()
        if not runs_attention_op(isa, 0):  # (attention_runs checked the sequence length)
            return None
        args = (list(self.choose(m, prepared, isa)), w_scale, bias, *act.kernel_args())
        op = torch.ops.sparse_ofa.cpu_qkv_attention.default
        return lambda x, mask: op(x, *args, mask, heads, scale, isa, bf16)

    def ffn_fn(self, first, second, m, gelu, post):
        # one cpu_ffn op: the intermediate stays channel-major in each thread's cache (csrc/cpu_ffn.cpp);
        # float32 (feed_forward's caller checks)
        isa = isa_code()
        if not runs_ffn_op(isa):
            return None
        has_residual, has_norm = post
        (prep1, w1_scale, b1, act1), (prep2, w2_scale, b2, act2) = first, second
        w1, w2 = list(self.choose(m, prep1, isa)), list(self.choose(m, prep2, isa))
        args1 = (w1, w1_scale, b1, *act1.kernel_args())
        args2 = (w2, w2_scale, b2, *act2.kernel_args())
        op = torch.ops.sparse_ofa.cpu_ffn.default

        def fn(x, residual, norm):
            weight, bias_, eps = norm if has_norm else (None, None, 1e-12)
            return op(x, *args1, *args2, gelu, residual if has_residual else None, weight, bias_, eps, isa)
        return fn

    def attention_runs(self, x: torch.Tensor, mask) -> bool:
        # fp32 [B, S, 3H] on an ISA path where the kernel measured faster than torch's SDPA for this many
        # keys (dispatch.runs_attention_op); a bool or fp32 mask; no autograd (the op has no backward)
        if x.dtype != torch.float32 or x.dim() != 3 or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if mask is not None and (mask.device.type != "cpu" or mask.dtype not in (torch.bool, torch.float32)
                                 or mask.dim() > 4):
            return False
        try:
            return runs_attention_op(effective_isa(), x.shape[-2])
        except ValueError:  # a bad $SPARSE_OFA_CPU_ISA: the linears raise it, attention steps aside
            return False

    def attention(self, qkv, mask, heads, scale, bf16=False):
        return torch.ops.sparse_ofa.cpu_attention.default(qkv, mask, heads, scale, -1, bf16)

    def bf16_attention(self) -> bool:
        return bf16_attention_supported()
