"""Fused QKV: one SparseInt8Linear [3H, K] built from a self-attention's q, k and v projections.

The packed weights are stacked along the output rows (formats.concat_packed, no requantization), so
the activations are quantized once instead of three times and one kernel call replaces three, with
the numerics of the three layers (per-token activation scales depend only on the shared input; each
output row keeps its own weight scale and bias). The fused layer is derived, like a backend layout:
held in the attention module's __dict__ (outside state_dict, named_modules and .to()), and rebuilt
when the q/k/v buffers, backend or activation quantization change (load_state_dict, .to(device),
set_backend).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import concat_packed
from ..modules import SparseInt8Linear

# Where a self-attention module keeps its q/k/v projections: BERT-style names, DistilBERT's.
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


def qkv_names(module: nn.Module) -> tuple[str, str, str]:
    names = getattr(type(module), "_qkv_names", None)  # a fast-path class knows its own
    if names is None:
        names = next((n for n in QKV_NAMES if n[0] in module._modules), QKV_NAMES[0])
    return names


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor (made under
    torch.inference_mode), which has none and cannot be changed in place outside that mode."""
    return -1 if tensor.is_inference() else tensor._version


def _qkv_signature(module: nn.Module) -> tuple | None:
    """What the fused weight is built from (None if q/k/v are not all SparseInt8Linear). Reads
    _modules/_buffers directly: this runs every forward and nn.Module.__getattr__ is slow. Holding
    the tensors keeps their ids from being reused."""
    mods = module._modules
    parts = tuple(mods.get(name) for name in qkv_names(module))
    if not all(isinstance(m, SparseInt8Linear) for m in parts):
        return None
    return tuple((m._buffers["weight_values"], _version(m._buffers["weight_values"]),
                  m._buffers["bias"], m.backend, m.act) for m in parts)


def _signature_matches(old: tuple, new: tuple) -> bool:
    return all(a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3] and a[4] == b[4]
               for a, b in zip(old, new))


def _build_fused_qkv(module: nn.Module) -> SparseInt8Linear:
    parts = tuple(module._modules[name] for name in qkv_names(module))
    packed = concat_packed([m.packed for m in parts])
    biases = [m.bias if m.bias is not None else torch.zeros_like(m.weight_scale) for m in parts]
    return SparseInt8Linear.from_packed(packed, torch.cat(biases), backend=parts[0].backend,
                                        act=parts[0].act)


def fused_qkv(module: nn.Module) -> SparseInt8Linear | None:
    """The module's fused QKV layer (rebuilt if q/k/v changed since the last call), or None when
    q/k/v cannot be fused (not all sparse, or different patterns/backends/quantization/devices)."""
    signature = _qkv_signature(module)
    if signature is None:
        return None
    cached = module.__dict__.get("_sparse_ofa_qkv")
    if cached is None or not _signature_matches(cached[0], signature):
        if not fusable(module):
            return None
        cached = (signature, _build_fused_qkv(module))
        # plain __dict__ entry, not a submodule: stays out of state_dict, named_modules and .to()
        module.__dict__["_sparse_ofa_qkv"] = cached
    return cached[1]


def fusable(module: nn.Module) -> bool:
    parts = [module._modules.get(name) for name in qkv_names(module)]
    if not all(isinstance(m, SparseInt8Linear) for m in parts):
        return False
    q = parts[0]
    return all(m.in_features == q.in_features and m.pattern == q.pattern and m.backend == q.backend
               and m.act == q.act and m.weight_values.device == q.weight_values.device
               for m in parts)
