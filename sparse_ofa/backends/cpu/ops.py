"""The CPU extension (csrc/, built on first use): loading it, the ISA its kernels run, the fake kernels
that let torch.compile trace its ops, and the post-op calling convention of its linear ops.

ISA: the best the CPU runs, or the one named by $SPARSE_OFA_CPU_ISA (scalar, avx2, avxvnni,
avx512vnni) if this CPU runs it. Threads: torch's pool (at::parallel_for), so torch.set_num_threads
applies.
"""
from __future__ import annotations

import os

import torch

from .. import env_value

EXTENSION = "sparse_ofa_cpu"
SOURCES = ["cpu_linear.cpp", "cpu/dispatch.cpp", "cpu/scalar.cpp", "cpu/avx2.cpp", "cpu/avxvnni.cpp",
           "cpu/avx512.cpp", "cpu_attention.cpp", "cpu/attention_scalar.cpp", "cpu/attention_avx512.cpp",
           "cpu/attention_bf16.cpp", "cpu/attention_avx2.cpp",
           "cpu/postops_scalar.cpp", "cpu/postops_avx512.cpp", "cpu/postops_avx2.cpp", "cpu_ffn.cpp", "cpu/ffn_avx512.cpp",
           "cpu/fused_avx2.cpp", "cpu/fused_avxvnni.cpp", "cpu_dense.cpp", "cpu/dense_scalar.cpp", "cpu/dense_avx2.cpp"]
# -ffp-contract=off: the epilogue must round like the reference ((acc * xs) * ws + b, no FMA).
# -fopenmp: at::parallel_for is inline OpenMP in the ATen headers; without the flag its pragma is
# ignored and every kernel runs on one thread (the OpenMP runtime is torch's own, already loaded).
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
ISA_NAMES = {v: k for k, v in ISAS.items()}

_state: dict[str, object] = {}


def load() -> None:
    """Build (first use, cached) and load the extension, and register its fake kernels."""
    if "loaded" in _state:
        return
    from ..._ext import load_extension

    # extra flags, e.g. the sanitizer build of scripts/asan_cpu.sh (use with its own TORCH_EXTENSIONS_DIR)
    cflags = CFLAGS + os.environ.get("SPARSE_OFA_CPU_CFLAGS", "").split()
    ldflags = LDFLAGS + os.environ.get("SPARSE_OFA_CPU_LDFLAGS", "").split()
    load_extension(EXTENSION, SOURCES, extra_cflags=cflags, extra_ldflags=ldflags)
    _register_fakes()
    _state["loaded"] = True


def best_isa() -> str:
    """The CPU's best ISA path (cpuid, constant per process: cached, this is on every call's path)."""
    if "best_isa" not in _state:
        load()
        _state["best_isa"] = ISA_NAMES[int(torch.ops.sparse_ofa.cpu_isa())]
    return _state["best_isa"]


def bf16_attention_supported() -> bool:
    """Whether cpu_attention / cpu_qkv_attention take bf16=True here (AVX-512 BF16; cached)."""
    if "bf16_attention" not in _state:
        load()
        _state["bf16_attention"] = bool(torch.ops.sparse_ofa.cpu_bf16_attention_supported())
    return _state["bf16_attention"]


def isa_code(name: str | None = None) -> int:
    """ISA code for the kernels: `name`, else $SPARSE_OFA_CPU_ISA, else -1 (the best available)."""
    name = name or env_value("SPARSE_OFA_CPU_ISA") or ""
    if not name:
        return -1
    if name not in ISAS:
        raise ValueError(f"unknown CPU ISA {name!r}; expected one of {sorted(ISAS)}")
    return ISAS[name]


def effective_isa() -> int:
    """The ISA code the ops will run: $SPARSE_OFA_CPU_ISA if set, else the CPU's best."""
    code = isa_code()
    return ISAS[best_isa()] if code < 0 else code


def _register_fakes() -> None:
    lib = "sparse_ofa::"

    @torch.library.register_fake(lib + "cpu_int_mm")
    def _(x_q, quad_w, quad_k, row_ptr, rowsum, layout, isa=-1):
        return x_q.new_empty((x_q.shape[0], row_ptr.shape[0] - 1), dtype=torch.int32)

    @torch.library.register_fake(lib + "cpu_linear")
    def _(x, quad_w, quad_k, row_ptr, rowsum, layout, w_scale, bias, static_scale, inv_scale, zero_point,
          qmin, qmax, out_dtype, isa=-1, residual=None, gelu=False, ln_weight=None, ln_bias=None, ln_eps=1e-12):
        return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1), dtype=out_dtype)

    @torch.library.register_fake(lib + "cpu_quantize")
    def _(x, static_scale, inv_scale, zero_point, qmin, qmax, isa=-1):
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32))

    @torch.library.register_fake(lib + "cpu_int_mm_out")
    def _(x_q, quad_w, quad_k, row_ptr, rowsum, layout, out, isa=-1):
        return None

    @torch.library.register_fake(lib + "cpu_attention")
    def _(qkv, mask, heads, scale, isa=-1, bf16=False):
        return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))

    @torch.library.register_fake(lib + "cpu_attention_out")
    def _(qkv, mask, heads, scale, out, isa=-1, bf16=False):
        return None

    @torch.library.register_fake(lib + "cpu_qkv_attention")
    def _(x, w, w_scale, bias, static_scale, inv_scale, zero_point, qmin, qmax, mask, heads, scale, isa=-1,
          bf16=False):
        return x.new_empty((x.shape[0], x.shape[1], (w[2].shape[0] - 1) // 3), dtype=torch.float32)

    @torch.library.register_fake(lib + "cpu_ffn")
    def _(x, w1, w1_scale, b1, static_scale1, inv_scale1, zero_point1, qmin1, qmax1, w2, w2_scale, b2,
          static_scale2, inv_scale2, zero_point2, qmin2, qmax2, gelu=True, residual=None, ln_weight=None,
          ln_bias=None, ln_eps=1e-12, isa=-1):
        return x.new_empty((*x.shape[:-1], w2[2].shape[0] - 1), dtype=torch.float32)

    @torch.library.register_fake(lib + "cpu_dense_linear")
    def _(x, w_t, w_scale, bias, static_scale, inv_scale, zero_point, qmin, qmax, out_dtype, isa=-1,
          residual=None, gelu=False, ln_weight=None, ln_bias=None, ln_eps=1e-12):
        return x.new_empty((*x.shape[:-1], w_t.shape[1]), dtype=out_dtype)

    @torch.library.register_fake(lib + "cpu_dense_panel_linear")
    def _(x, w_panel, w_layout, w_scale, bias, static_scale, inv_scale, zero_point, qmin, qmax, out_dtype, isa=-1,
          residual=None, gelu=False, ln_weight=None, ln_bias=None, ln_eps=1e-12):
        return x.new_empty((*x.shape[:-1], w_scale.shape[0]), dtype=out_dtype)

    # (cpu_dense_panel_int_mm has no fake kernel: its N is data, w_layout[1], not a shape; only the
    # reference-composed Backend.linear and the tests call it, never under torch.compile)

    @torch.library.register_fake(lib + "cpu_linear_out")
    def _(x, quad_w, quad_k, row_ptr, rowsum, layout, w_scale, bias, static_scale, inv_scale, zero_point,
          qmin, qmax, out, isa=-1, residual=None, gelu=False, ln_weight=None, ln_bias=None, ln_eps=1e-12):
        return None


def fuses_post_ops(isa: int, out_dtype: torch.dtype, post: tuple[bool, bool, bool]) -> bool:
    """Whether an op of this extension should run `post` (residual, GELU, LayerNorm) itself: only in
    float32 and with the AVX-512 or AVX2 post-ops (the portable ones are no faster than torch's)."""
    return not any(post) or (out_dtype == torch.float32
                             and (ISAS[best_isa()] if isa < 0 else isa) >= ISAS["avx2"])


def post_op_fn(op, args: tuple, post: tuple[bool, bool, bool]):
    """fn(x, residual, norm) -> op(x, *args[, residual, gelu, ln_weight, ln_bias, ln_eps]): the
    linear_fn of an op taking the post-op arguments after `args` (cpu_linear, cpu_dense_linear)."""
    if not any(post):
        return lambda x, residual=None, norm=None: op(x, *args)
    has_residual, gelu, has_norm = post

    def fn(x, residual, norm):
        weight, bias, eps = norm if has_norm else (None, None, 1e-12)
        return op(x, *args, residual if has_residual else None, gelu, weight, bias, eps)
    return fn
