"""Giving a model the fast path (`apply_fastpath`, what `sparsify()` calls) and taking it away
(`remove_fastpath`): each module the fast path knows gets its model class with a fast-path mixin in
front (guards.fast_class), in this order:

    self-attention   fused QKV + fused attention          attention.py, qkv.py
    encoder layer    lean forward, post-ops fused         layer.py (+ ffn.py: the FFN block as one op)
    embeddings       lean forward, same bits              embeddings.py
    base model       lean forward around the above        model.py

The state_dict is untouched: the fused QKV weight and every cached route are derived, held outside
the module tree.
"""
from __future__ import annotations

from torch import nn

from .attention import ATTENTION_MODES, FastSelfAttentionMixin, attention_mixin
from .embeddings import FastEmbeddingsMixin, lean_embeddings_mixin
from .guards import FastMixin, base_class, fast_class
from .layer import FastLayerMixin, lean_layer_mixin
from .model import FastModelMixin, lean_model_mixin
from .qkv import fusable


def apply_fastpath(model: nn.Module, *, attention: str = "fp32", fuse: bool = True) -> list[str]:
    """Give `model` the fast path (again, to change its options); return the names of the modules
    that got it now.

    Every fusable self-attention gets fused QKV + fused attention; every BERT-style layer around one
    gets the lean layer forward (layer.py), the model's BERT-style embeddings a lean forward
    (embeddings.py, same output bit for bit), and a BERT-style base model around them a lean forward
    of its own (model.py). attention: "fp32" (default: a backend's fused kernel where one runs, the
    cpu backend's where it measured faster than SDPA, else torch's SDPA; fp32 numerics), "sdpa"
    (always torch's SDPA) or "bf16" (attention products on bfloat16 inputs on CPU where that is faster, slightly different
    numerics: see attention.py).
    fuse: run residual add + LayerNorm and GELU as post-ops inside the linear kernels (cpu and dense
    backends, AVX-512 and AVX2), and the feed-forward block as one op where the backend has one.
    attention="sdpa", fuse=False computes exactly what the plain sparsified model does."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, FastSelfAttentionMixin) or attention_mixin(module) is not None:
            if not fusable(module):
                continue
            _give_fast_class(module, FastSelfAttentionMixin, attention_mixin)
            module._sparse_ofa_attention = attention
            changed.append(name)
    for name, module in model.named_modules():  # after the attentions: a lean layer needs one
        if _give_fast_class(module, FastLayerMixin, lean_layer_mixin):
            changed.append(name)
        if isinstance(module, FastLayerMixin):
            module._sparse_ofa_fuse = bool(fuse)
    if changed:  # a BERT-style encoder: its embeddings and base model too
        for base, detect in ((FastEmbeddingsMixin, lean_embeddings_mixin), (FastModelMixin, lean_model_mixin)):
            for name, module in model.named_modules():
                if _give_fast_class(module, base, detect):
                    changed.append(name)
    return changed


def _give_fast_class(module: nn.Module, base: type, detect) -> bool:
    """Swap in the fast class of the mixin `detect(module)` names, unless the module has a `base`
    mixin already; whether it was swapped."""
    if isinstance(module, base):
        return False
    mixin = detect(module)
    if mixin is None:
        return False
    module.__class__ = fast_class(type(module), mixin)
    return True


def remove_fastpath(model: nn.Module) -> int:
    """Undo apply_fastpath: back to the model's own classes; returns how many modules changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, FastMixin):
            module.__class__ = base_class(module)
            for key in FastMixin._DERIVED + ("_sparse_ofa_attention", "_sparse_ofa_fuse"):
                module.__dict__.pop(key, None)
            count += 1
    return count
