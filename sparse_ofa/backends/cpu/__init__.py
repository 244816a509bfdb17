"""The CPU side: the C++ extension and its ISA (ops.py), the weight layouts derived from packed format
v1 (layouts.py), the rules behind backend="auto" on a CPU (dispatch.py), and the `cpu` backend
itself (backend.py)."""
from .backend import CpuBackend
from .dispatch import dense_route, measure_cpu_route, sparse_preferred, work_fraction
from .layouts import MAX_QUAD_CHANNELS, derive_gathered, derive_panel, derive_quads
from .ops import ISA_NAMES, ISAS, best_isa, bf16_attention_supported, effective_isa, isa_code, load

__all__ = ["CpuBackend", "ISAS", "ISA_NAMES", "MAX_QUAD_CHANNELS", "best_isa", "bf16_attention_supported", "dense_route",
           "derive_gathered", "derive_panel", "derive_quads", "effective_isa", "isa_code", "load",
           "measure_cpu_route", "sparse_preferred", "work_fraction"]
