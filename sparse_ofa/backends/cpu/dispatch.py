"""When the CPU runs a layer sparse, and how it runs dense INT8: the rules behind backend="auto".

Sparse wins when the work it keeps, `work_fraction` (kept quads against dense INT8's, the cheaper of
the two layouts for the token count), is small enough against dense INT8 on this CPU. The limits
below are per token count and thread count, measured on whole models as well as single layers (the
measurements, per CPU, are in bench/NOTES.md, "CPU dispatch limits"; per-layer kernel tables in
docs/cpu_kernels.md). Dense INT8 is the dense backend's route: `torch._int_mm` where VNNI makes it
fast, the exact int16-pair panel GEMM elsewhere (`dense_route`, measured once per process).
"""
from __future__ import annotations

import time

import torch

from .. import env_value
from ..base import LayerInfo
from .ops import ISAS, best_isa, effective_isa, load
from .layouts import derive_panel

def quad_density(info: LayerInfo) -> float:
    """Expected fraction of kept aligned quads for a layer of this pattern/density: exact for 1x4;
    for unstructured, a quad is kept if any of its 4 (about independent) weights is: 1 - (1-d)^4."""
    if info.pattern == "1x4":
        return info.density
    if info.pattern == "2:4":
        return min(1.0, 2 * info.density)  # at most 2 per quad: at least d*2 of quads hold one
    return 1.0 - (1.0 - info.density) ** 4


# Cost of one gathered quad against one aligned quad, per 16 tokens (4 loads + 8 unpacks + 4
# vpdpbusd per 64 tokens against 4 loads + 4 vpdpbusd): measured 1.4-1.6 on Zen 5 (docs/cpu_kernels.md),
# 1.65-1.75 on the int16 AVX2 kernels (bench/NOTES.md "Layout choice on AVX2 after the int16 layouts").
GATHER_COST = 1.5


def layout_steps(isa: int) -> tuple[int, int]:
    """Tokens per step of the aligned and of the gathered kernel of ISA code `isa`: 16 / 64 on
    AVX-512 (one zmm of tokens; 4 per gathered pass), 8 / 32 on the 256-bit paths (a ymm; their
    gathered pass takes 64 tokens, or 32 for a rest of up to 32)."""
    return (16, 64) if isa == ISAS["avx512vnni"] else (8, 32)


def layout_costs(m: int, n_quads: int, n_gathered: int | None,
                 steps: tuple[int, int] = (16, 64)) -> tuple[float, float]:
    """(aligned, gathered) cost in aligned-quad x 16-token units for m tokens, each kernel's tokens
    rounded up to its step (`layout_steps`)."""
    a, g = steps
    aligned = n_quads * -(-m // a) * a / 16
    if n_gathered is None:
        return aligned, float("inf")
    return aligned, GATHER_COST * n_gathered * 4 * -(-m // g) * g / 64


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
    isa = effective_isa()
    if info.pattern != "1x4" and runs_gathered(isa):
        gathered = -(-info.density * info.in_features // 4)
    steps = layout_steps(isa)
    aligned, gath = layout_costs(m, quads, gathered, steps)
    dense = layout_costs(m, per_row, None, steps)[0]  # every quad kept, in the aligned kernel's steps
    return min(aligned, gath) / dense


# (max M, max work fraction) on AVX-512 VNNI against torch._int_mm, one thread: sparse where it
# won with a margin in single layers at few tokens, and in whole models from 5 tokens on (the fused
# linear, FFN and attention ops only the sparse path has outweigh a product's deficit).
_THRESHOLDS = ((4, 0.05), (32, 0.35), (None, 0.5))
# Two or more threads: at 2-32 tokens the sparse kernels split the output channels and scale better
# than _int_mm at few rows; one token stays dense (_int_mm has a fast vector path there).
_THRESHOLDS_THREADS = ((1, 0.05), (32, 0.65), (None, 0.5))
# CPUs without VNNI, where dense INT8 is the panel GEMM: the AVX2 sparse kernels against it, per
# layer and in whole models (a 2-core Zen 3; from 5 tokens re-measured on whole models after the
# int16 activation layouts, AVX2 emulated on a Xeon: sparse won at work 0.45-0.5 by 22-45 % and at
# 0.6 by 5-12 %, bench/NOTES.md "AVX2 dispatch limits after the int16 layouts").
_THRESHOLDS_AVX2 = ((1, 0.05), (4, 0.1), (None, 0.5))


def _avx2_limit(m: int) -> float:
    return next(t for max_m, t in _THRESHOLDS_AVX2 if max_m is None or m <= max_m)


def sparse_preferred(m: int, info: LayerInfo) -> bool:
    """Under backend="auto": whether the cpu backend's sparse kernels run m tokens of this layer
    (else dense INT8)."""
    isa = effective_isa()
    if isa == ISAS["scalar"]:
        return False  # the portable loop never beats oneDNN's dense INT8
    table = _THRESHOLDS if torch.get_num_threads() < 2 else _THRESHOLDS_THREADS
    limit = next(t for max_m, t in table if max_m is None or m <= max_m)
    if isa != ISAS["avx512vnni"] and dense_route() == "panel":
        return work_fraction(m, info) <= _avx2_limit(m) + 1e-9
    if isa != ISAS["avx512vnni"]:
        # 256-bit sparse kernels against a fast _int_mm (a VNNI CPU with the ISA forced down): they
        # are 2.6-4.4x slower than the AVX-512 ones, _int_mm about 2x, and the fused ops behind
        # the 0.5 limit were AVX-512 only when this was measured (not re-measured since the 256-bit
        # paths have them): demand half of at most 0.35.
        limit = min(limit, 0.35) / 2
    return work_fraction(m, info) <= limit + 1e-9  # (a 1x4 layer at exactly 80 % is 0.2000...04)


DENSE_ROUTES = ("int_mm", "panel")
_route: dict[str, str] = {}


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up (first-call allocations, oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def measure_cpu_route(m: int = 64, k: int = 384, n: int = 384) -> dict[str, float]:
    """CPU seconds (best of 5) of one m x k x n exact int8 product by each CPU route that computes it
    exactly (checked against int64 first; raises if neither does), on one thread. One thread and the
    calling thread's CPU time: with several threads on a busy machine a wall-clock product waits for
    descheduled threads at its barriers (steps of a scheduler slice, 4-40 ms, seen on a shared Zen 3),
    which once made the route that is 50x slower there win the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_routes(m, k, n)
    finally:
        torch.set_num_threads(threads)


def _measure_routes(m: int, k: int, n: int) -> dict[str, float]:
    load()
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_t, panel = w_q.t(), derive_panel(w_q)
    op = torch.ops.sparse_ofa.cpu_dense_panel_int_mm
    # both against the exact int64 product: a route that gets it wrong is not timed (torch's _int_mm
    # with oneDNN held to AVX2 on an AVX-512 CPU, ONEDNN_MAX_CPU_ISA=AVX2, returned products off by up
    # to 1e5 in torch 2.13)
    exact = x_q.long() @ w_q.long().t()
    routes = {"int_mm": lambda: torch._int_mm(x_q, w_t), "panel": lambda: op(x_q, panel["w_panel"], panel["w_layout"])}
    right = {name: fn for name, fn in routes.items() if torch.equal(fn().long(), exact)}
    if not right:
        raise RuntimeError("sparse_ofa dense: neither torch._int_mm nor the panel GEMM is exact on this CPU")
    return {name: _best_seconds(fn) for name, fn in right.items()}


def dense_route() -> str:
    """"int_mm" or "panel": how this process multiplies dense INT8 on the CPU: $SPARSE_OFA_DENSE_ROUTE
    if set, else the faster of the two on one 64 x 384 x 384 product (measure_cpu_route)."""
    forced = env_value("SPARSE_OFA_DENSE_ROUTE")
    if forced:
        if forced not in DENSE_ROUTES:
            raise ValueError(f"SPARSE_OFA_DENSE_ROUTE={forced!r}; expected one of {DENSE_ROUTES}")
        return forced
    if "cpu" not in _route:
        try:  # (builds the extension) the panel kernel needs AVX2 to be fast: its portable loop is for checks
            panel_fast = best_isa() != "scalar"
        except Exception:  # noqa: BLE001 - no compiler for the extension: torch's _int_mm
            panel_fast = False
        if not panel_fast:
            _route["cpu"] = "int_mm"
        else:
            times = measure_cpu_route()
            _route["cpu"] = min(times, key=times.get)
    return _route["cpu"]


# ISA codes on which the fast path calls the fused ops (csrc/cpu_ffn.cpp, csrc/cpu_attention.cpp): they
# exist for AVX-512 and the 256-bit paths (AVX2 / AVX-VNNI with FMA; the portable path runs their op
# sequences), and are called where they measured faster than the unfused route (bench/NOTES.md,
# "Fused FFN and QKV-attention on the 256-bit paths").
FFN_OP_ISAS = frozenset({ISAS["avx512vnni"], ISAS["avxvnni"], ISAS["avx2"]})
ATTENTION_OP_ISAS = frozenset({ISAS["avx512vnni"], ISAS["avxvnni"], ISAS["avx2"]})
# The 256-bit attention kernel is up to 1.3x slower than torch's SDPA at 256-512 keys (1 thread, AVX2):
# there the fast path keeps SDPA.
MAX_KEYS_256 = 128


def runs_ffn_op(isa: int) -> bool:
    """Whether the fused FFN op is the faster route for ISA code `isa` (-1 = the best)."""
    return (ISAS[best_isa()] if isa < 0 else isa) in FFN_OP_ISAS


def runs_attention_op(isa: int, keys: int) -> bool:
    """Whether the attention kernel (and the fused QKV projection + attention) is the faster route than
    torch's SDPA after the projection, for ISA code `isa` (-1 = the best) and `keys` keys."""
    isa = ISAS[best_isa()] if isa < 0 else isa
    return isa in ATTENTION_OP_ISAS and (isa == ISAS["avx512vnni"] or keys <= MAX_KEYS_256)
