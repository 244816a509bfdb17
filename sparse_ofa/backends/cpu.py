"""The `cpu` backend: sparse-INT8 kernels in C++ (csrc/cpu/), exposed as torch.ops.sparse_ofa.cpu_*.

prepare() derives the kernel layouts from packed format v1, once per module (csrc/cpu/sparse_cpu.h):
- kind 0, aligned quads: each output row keeps the aligned input-channel quads (k = 4q..4q+3) that
  hold a non-zero weight, as one int32 of 4 int8 weights plus the quad index. For "1x4" weights the
  kept quads are exactly the kept blocks; for unstructured weights a quad with any non-zero weight
  is kept, zeros inside (at 90 % sparsity ~34 % of the quads, 3.4x the useful work).
- kind 1, gathered quads (unstructured / 2:4 only): a row's non-zero weights in groups of 4
  arbitrary input channels; the kernel interleaves 4 activation rows in registers. No padding
  work, ~1.5x the cost per quad: 2-3x faster than kind 0 at 80-90 % unstructured.
Each call picks the cheaper one for its token count (`choose`).

The fused linear quantizes activations per token (or with the static QAT scale) exactly as
sparse_ofa/quant.py does, multiplies with vpdpbusd (AVX-512 VNNI / AVX-VNNI) or an exact vpmaddwd
form (AVX2) or plain C++ (any CPU), and applies the epilogue (x_scale * w_scale, bias, fp32/bf16) in
the kernel. Threads: torch's pool (at::parallel_for), so torch.set_num_threads applies.

ISA: the best the CPU runs, or the one named by SPARSE_OFA_CPU_ISA (scalar, avx2, avxvnni,
avx512vnni) if this CPU runs it.

Dispatch (`prefers`): sparse wins when the VNNI work it keeps, the fraction of kept quads, is small
enough against dense INT8 (`torch._int_mm`, or on CPUs without VNNI the dense backend's panel GEMM,
with limits of their own); see `prefers` and docs/cpu_kernels.md for the measured thresholds.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats import PackedWeight, unpack_int8
from ..quant import ActQuant
from . import env_value
from .base import Backend, LayerInfo

EXTENSION = "sparse_ofa_cpu"
SOURCES = ["sparse_ofa_cpu.cpp", "cpu/dispatch.cpp", "cpu/scalar.cpp", "cpu/avx2.cpp", "cpu/avxvnni.cpp",
           "cpu/avx512.cpp", "cpu_attention.cpp", "cpu/attention_scalar.cpp", "cpu/attention_avx512.cpp",
           "cpu/attention_bf16.cpp",
           "cpu/attention_avx2.cpp",
           "cpu/postops_scalar.cpp", "cpu/postops_avx512.cpp", "cpu/postops_avx2.cpp", "cpu_ffn.cpp", "cpu/ffn_avx512.cpp",
           "cpu/fused_avx2.cpp", "cpu/fused_avxvnni.cpp",
           "cpu_dense.cpp", "cpu/dense_scalar.cpp", "cpu/dense_avx2.cpp"]
# -ffp-contract=off: the epilogue must round like the reference ((acc * xs) * ws + b, no FMA).
# -fopenmp: at::parallel_for is inline OpenMP in the ATen headers; without the flag its pragma is
# ignored and every kernel runs on one thread (the OpenMP runtime is torch's own, already loaded).
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
LAYOUT_VERSION = 2  # "quads v2": 16-bit quad_k
MAX_IN_FEATURES = 65536  # what a 16-bit channel index reaches; wider layers keep another backend
ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
ISA_NAMES = {v: k for k, v in ISAS.items()}

_state: dict[str, object] = {}


def load() -> None:
    """Build (first use, cached) and load the extension, and register its fake kernels."""
    if "loaded" in _state:
        return
    from .._ext import load_extension

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


def _as_u16(index: torch.Tensor) -> torch.Tensor:
    """Indices in [0, 65536) as the int16 tensor whose bits the kernels read as uint16."""
    index = index.to(torch.int32)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= MAX_IN_FEATURES):
        raise ValueError(f"quad index out of the 16-bit range [0, {MAX_IN_FEATURES})")
    return torch.where(index >= 32768, index - 65536, index).to(torch.int16).contiguous()


def derive_quads(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """Layout kind 0, aligned quads (csrc/cpu/sparse_cpu.h), from packed format v1."""
    packed.validate()
    w = unpack_int8(packed).cpu()
    n, k = w.shape
    w4 = F.pad(w, (0, -k % 4)).view(n, -1, 4)
    kept = (w4 != 0).any(-1)                      # [N, Q]: quads with a non-zero weight
    rows_quads = kept.nonzero()                   # row-major: ascending q within each row
    quad_w = w4[kept].contiguous().view(torch.int32).reshape(-1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = kept.sum(1).cumsum(0)
    return {
        "quad_w": quad_w,
        "quad_k": _as_u16(rows_quads[:, 1]),
        "row_ptr": row_ptr.to(torch.int32),
        "rowsum": w.sum(1, dtype=torch.int32),
        "layout": torch.tensor([LAYOUT_VERSION, n, k, quad_w.numel(), 0], dtype=torch.int32),
    }


def derive_gathered(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """Layout kind 1, gathered quads: each row's non-zero weights, ascending k, in groups of 4
    arbitrary input channels; the last group of a row padded with weight 0 on its first channel."""
    packed.validate()
    w = unpack_int8(packed).cpu()
    n, k = w.shape
    nonzero = w != 0
    rows, cols = nonzero.nonzero(as_tuple=True)
    counts = nonzero.sum(1)
    quads_per_row = (counts + 3) // 4
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = quads_per_row.cumsum(0)
    first_nz = torch.zeros(n + 1, dtype=torch.int64)
    first_nz[1:] = counts.cumsum(0)
    slot = row_ptr[rows] * 4 + (torch.arange(rows.numel()) - first_nz[rows])
    nq = int(row_ptr[-1])
    quad_k = torch.full((nq * 4,), -1, dtype=torch.int64)
    quad_k[slot] = cols
    values = torch.zeros(nq * 4, dtype=torch.int8)
    values[slot] = w[rows, cols]
    quad_k = quad_k.view(nq, 4)
    quad_k = torch.where(quad_k < 0, quad_k[:, :1].expand_as(quad_k), quad_k)  # padding: a real row
    return {
        "quad_w": values.view(nq, 4).view(torch.int32).reshape(-1).contiguous(),
        "quad_k": _as_u16(quad_k.reshape(-1)),
        "row_ptr": row_ptr.to(torch.int32),
        "rowsum": w.sum(1, dtype=torch.int32),
        "layout": torch.tensor([LAYOUT_VERSION, n, k, nq, 1], dtype=torch.int32),
    }


def quad_density(info: LayerInfo) -> float:
    """Expected fraction of kept aligned quads for a layer of this pattern/density: exact for 1x4;
    for unstructured, a quad is kept if any of its 4 (about independent) weights is: 1 - (1-d)^4."""
    if info.pattern == "1x4":
        return info.density
    if info.pattern == "2:4":
        return min(1.0, 2 * info.density)  # at most 2 per quad: at least d*2 of quads hold one
    return 1.0 - (1.0 - info.density) ** 4


# Cost of one gathered quad against one aligned quad, per 16 tokens (4 loads + 8 unpacks + 4
# vpdpbusd per 64 tokens against 4 loads + 4 vpdpbusd): measured 1.4-1.6 on Zen 5 (docs/cpu_kernels.md).
GATHER_COST = 1.5


def layout_costs(m: int, n_quads: int, n_gathered: int | None) -> tuple[float, float]:
    """(aligned, gathered) cost in aligned-quad x 16-token units for m tokens."""
    aligned = n_quads * -(-m // 16)
    if n_gathered is None:
        return aligned, float("inf")
    return aligned, GATHER_COST * n_gathered * 4 * -(-m // 64)  # gathered works on 64 tokens


def runs_gathered(isa: int) -> bool:
    """Whether ISA code `isa` has a gathered-quad kernel (AVX-512 and AVX2 / AVX-VNNI; the portable
    path would run them with its scalar loop, so it keeps aligned quads)."""
    return isa >= ISAS["avx2"]


def work_fraction(m: int, info: LayerInfo) -> float:
    """Sparse VNNI work relative to dense INT8 for m tokens (the better of the two layouts)."""
    m = max(m, 1)
    per_row = -(-info.in_features // 4)
    quads = quad_density(info) * per_row
    gathered = None
    if info.pattern != "1x4" and runs_gathered(effective_isa()):
        gathered = -(-info.density * info.in_features // 4)
    aligned, gath = layout_costs(m, quads, gathered)
    return min(aligned, gath) / (per_row * -(-m // 16))


# Dispatch thresholds on work_fraction, measured with bench/test_layers_cpu.py and the same shapes on a
# 2-core Zen 5 (docs/cpu_kernels.md), one thread, hot caches, product alone against torch._int_mm:
#   M = 128:  1x4 90 % (work 0.10) 3.1-3.9x; unstructured 90 % (0.16) 2.4-2.7x; 80 % (0.31) 1.4-1.5x
#   M = 1024: 1x4 90 % 2.2-3.7x; unstructured 90 % 1.4-2.8x; 80 % 0.5-1.0x
#   M = 16:   1x4 90 % 2.8-3.7x; unstructured 90 % (aligned quads, 0.34) 1.1-1.3x; 80 % 0.7-1.0x
#   M = 1:    dense INT8 reads a cache-hot weight in ~5 us; sparse loses (0.5x) except on 3072x768 1x4
# so sparse is chosen where it won with a margin, else dense INT8 (never slower than dense).
# Above 256 tokens the limit was 0.2 (from the M = 1024 product-alone row) until stop 11 measured
# whole models: all-MiniLM-L6-v2 at 80 % unstructured (work ~0.3), 2 threads, sparse forced vs
# what 0.2 picked (dense INT8): 20.0 vs 47.3 ms at 32 x 44 tokens, 202 vs 1324 ms at 96 x 128
# (`quantize_dynamic` 49.5 / 684 ms): the fused linear and the fused FFN / attention ops, which
# only the sparse path has, outweigh the product's deficit, so large M takes M <= 256's limit.
# Stop 12 measured whole models at 1-46 tokens (medians of 200 interleaved forwards, after the dense
# path became one fused op as well): from 5 tokens on, sparse layers up to work 0.34 (90 %
# unstructured, 70 % 1x4) were as fast or faster than dense INT8 at 1 and 2 threads (12 tokens:
# 0.78 vs 1.07 ms at 2 threads, 1.38 vs 1.47 at 1; 32 tokens, 1 thread: 1.59 vs 2.61 ms): the
# hot-cache product-alone rows behind the old 0.2 up to 32 tokens miss that a model's dense weights
# stream from L3 while the sparse ones are 3-10x smaller. Up to 4 tokens dense INT8 won at 1 thread
# (2 tokens: 1.19 vs 1.33 ms) though not at 2; one token always. Work 0.5-0.76 won at 2 threads but
# lost at 1 (80 % unstructured, 12 tokens: 2.02 vs 1.88 ms), so the limit there stays 0.35.
# Above 32 tokens whole models (all-MiniLM-L6-v2 and the BERT-base shape) ran faster sparse at every
# work fraction up to 0.56 measured, at 1 and 2 threads: 70 % unstructured (0.45) 8-25 % at
# 64-1,024 tokens, 1x4 60 % (0.4) 13-20 %, 1x4 50 % (0.5) 17 % at 46 tokens; 0.6 lost 6 % (70 %
# unstructured, 46 tokens), 0.75 (50 % unstructured) lost at 1,408 tokens: the limit is 0.5.
_THRESHOLDS = ((4, 0.05), (32, 0.35), (None, 0.5))  # (max M, max work fraction), one thread
# Two or more threads (stop 13, `.dev/small_m.py` / `.dev/base_m.py`, auto / sparse / dense forced
# interleaved, 2 threads): at 2-32 tokens sparse scales better than dense INT8 (~2x vs ~1.5x from 1
# to 2 threads: it splits the output channels, `_int_mm` at few rows barely splits). all-MiniLM-L6-v2
# 80 % unstructured (work 0.59) 1.01-1.43 vs 1.17-1.79 ms at 5-32 tokens, 0.97-1.01 vs 1.12-1.15 at
# 2-4; 70 % (0.76) 1.09-1.51 vs 1.19-1.76 at 2-32; BERT-base shape 80 % 4.94-8.09 vs 6.10-9.21 ms at
# 2-32 tokens, 70 % won at 2-12 tokens (5.96-6.24 vs 6.32-7.59) but lost at 32 (10.31 vs 9.45).
# One token stays dense (0.73-0.88 vs 0.78-1.11 ms: `_int_mm` has a fast vector path there).
_THRESHOLDS_THREADS = ((1, 0.05), (32, 0.65), (None, 0.5))


# AVX2 CPUs where the dense route is the panel GEMM (backends/dense.py, no VNNI), measured on a 2-core
# Zen 3 (bench/NOTES.md "AVX2-only CPUs"): the AVX2 sparse kernels against the panel GEMM per layer
# (768x768, 3072x768, 768x3072; 50-90 % unstructured and 1x4; one thread, CPU time, fused linear
# with its epilogue): M = 1 dense wins everywhere but 1x4 90 % on 768x768 (0.86x); M = 4 sparse wins
# at work 0.1 (0.5-0.75x), not at 0.2 (1.0-1.3x); M = 16-128 sparse wins up to work 0.30-0.34
# (0.25-0.9x), is even or loses at 0.45-0.6 (0.58-1.67x). Whole models confirm (NOTES).
_THRESHOLDS_AVX2 = ((1, 0.05), (4, 0.1), (None, 0.35))


def _avx2_limit(m: int) -> float:
    return next(t for max_m, t in _THRESHOLDS_AVX2 if max_m is None or m <= max_m)


def _dense_route() -> str:
    from .dense import cpu_route

    return cpu_route()


# ISA codes on which the fast path calls the fused ops (csrc/cpu_ffn.cpp, csrc/cpu_attention.cpp): they
# exist for AVX-512 and the 256-bit paths (AVX2 / AVX-VNNI with FMA; the portable path runs their op
# sequences), and are called where they measured faster than the unfused route (bench/NOTES.md,
# "Fused FFN and QKV-attention on the 256-bit paths").
FFN_OP_ISAS = frozenset({ISAS["avx512vnni"], ISAS["avxvnni"], ISAS["avx2"]})
ATTENTION_OP_ISAS = frozenset({ISAS["avx512vnni"], ISAS["avxvnni"], ISAS["avx2"]})


def runs_ffn_op(isa: int) -> bool:
    """Whether the fused FFN op is the faster route for ISA code `isa` (-1 = the best)."""
    return (ISAS[best_isa()] if isa < 0 else isa) in FFN_OP_ISAS


# The 256-bit attention kernel is up to 1.3x slower than torch's SDPA at 256-512 keys (1 thread, AVX2):
# there the fast path keeps SDPA.
MAX_KEYS_256 = 128


def runs_attention_op(isa: int, keys: int) -> bool:
    """Whether the attention kernel (and the fused QKV projection + attention) is the faster route than
    torch's SDPA after the projection, for ISA code `isa` (-1 = the best) and `keys` keys."""
    isa = ISAS[best_isa()] if isa < 0 else isa
    return isa in ATTENTION_OP_ISAS and (isa == ISAS["avx512vnni"] or keys <= MAX_KEYS_256)


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
        return device.type == "cpu" and info.in_features <= MAX_IN_FEATURES

    def prefers(self, m: int, info: LayerInfo) -> bool:
        isa = effective_isa()
        if isa == ISAS["scalar"]:
            return False  # the portable loop never beats oneDNN's dense INT8
        table = _THRESHOLDS if torch.get_num_threads() < 2 else _THRESHOLDS_THREADS
        limit = next(t for max_m, t in table if max_m is None or m <= max_m)
        if isa != ISAS["avx512vnni"] and _dense_route() == "panel":
            # dense INT8 is the panel GEMM (a CPU where torch._int_mm is slow: no VNNI): the AVX2 limits
            return work_fraction(m, info) <= _avx2_limit(m) + 1e-9
        if isa != ISAS["avx512vnni"]:
            # dense INT8 is torch._int_mm: the 256-bit paths (measured on this Zen 5 with the ISA forced, 768x768, M = 128: at
            # stop 12 AVX-VNNI 1x4 90 % product 0.115 ms, AVX2 0.189 ms against the AVX-512 path's
            # 0.043 ms; after stop 13's vectorised pack and epilogue 0.061 / 0.077 vs 0.023 ms at 2
            # threads) are 2.6-4.4x slower, dense INT8 on such a CPU about 2x: demand half the work. (And no more than half of
            # 0.35: the whole-model wins behind 0.5 above 32 tokens came with the fused FFN /
            # attention ops and post-ops; these limits were set before the 256-bit paths had the
            # fused ops and were not re-measured with them.)
            limit = min(limit, 0.35) / 2
        return work_fraction(m, info) <= limit + 1e-9  # (a 1x4 layer at exactly 80 % is 0.2000...04)

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
        if n_gathered is not None:
            eff = effective_isa() if isa is None else (ISAS[best_isa()] if isa < 0 else isa)
            if not runs_gathered(eff):
                n_gathered = None
        aligned, gathered = layout_costs(m, n_quads, n_gathered)
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
        if not runs_attention_op(isa, 0):  # (the caller checked the sequence length)
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
