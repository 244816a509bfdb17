"""Lean forward for a BERT-style encoder layer whose self-attention has the fast path.

The model's own layer forward spends ~50-100 us of Python per layer on the way to its ~10 ops:
kwarg-deprecation wrappers, four container modules (attention, self-output, intermediate, output),
three eval-mode dropouts and `apply_chunking_to_forward` (which calls inspect.signature every time).
This forward calls the leaf modules directly in the model's own order:

    a  = attention.self(h, mask)                       (the fast fused-QKV attention)
    h1 = attention.output.LayerNorm(attention.output.dense(a) + h)
    h2 = output.LayerNorm(output.dense(intermediate.act(intermediate.dense(h1))) + h1)

Leaf modules with hooks are called as modules, so their hooks run; unhooked ones are called for
less Python: SparseInt8Linear.direct (one op per linear), the LayerNorm op, the attention's
fast_attention. It steps aside (the model's forward
runs) while training, under tracing, with a cache or cross-attention, with feed-forward chunking,
when a skipped container module has hooks, and for good if its first call (run both ways) does not
match the model's own forward, whose return structure (tensor or 1-tuple) it then copies.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from .fastpath import FastMixin, FastSelfAttentionMixin, _uses_cache
from .modules import SparseInt8Linear

_CONTAINERS = ("attention", "intermediate", "output")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _containers(layer: nn.Module):
    mods = layer._modules
    attention = mods.get("attention")
    return attention, attention._modules.get("output"), mods.get("intermediate"), mods.get("output")


def _eligible(layer: nn.Module, args, kwargs) -> bool:
    if (layer.training or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or kwargs.get("output_attentions") or _uses_cache(args, kwargs)
            or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks):
        return False
    containers = _containers(layer)
    return not any(_has_hooks(m) for m in containers)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), as SparseInt8Linear.direct (one op) when nothing hooks the module."""
    if type(module) is SparseInt8Linear and not _has_hooks(module):
        return module.direct(x)
    return module(x)


def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), as the op itself for a plain, unhooked nn.LayerNorm (what its forward calls)."""
    if type(module) is nn.LayerNorm and not _has_hooks(module):
        p = module._parameters
        return torch.layer_norm(x, module.normalized_shape, p["weight"], p["bias"], module.eps)
    return module(x)


def _lean_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor:
    attention, self_output, intermediate, output = _containers(layer)
    self_attn = attention._modules["self"]
    attn = None
    if not _has_hooks(self_attn) and not self_attn.training:
        attn = self_attn.fast_attention(hidden_states, attention_mask)
    if attn is None:
        attn = self_attn(hidden_states, attention_mask)[0]
    so = self_output._modules
    h1 = _layer_norm(so["LayerNorm"], _linear(so["dense"], attn) + hidden_states)
    inner = intermediate.intermediate_act_fn(_linear(intermediate._modules["dense"], h1))
    out = output._modules
    return _layer_norm(out["LayerNorm"], _linear(out["dense"], inner) + h1)


def _same(mine: torch.Tensor, theirs) -> str | None:
    """'tensor' or 'tuple' if the model's output `theirs` holds `mine`; None if it does not."""
    if isinstance(theirs, tuple) and len(theirs) == 1:
        kind, theirs = "tuple", theirs[0]
    else:
        kind = "tensor"
    if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
        return None
    return kind if torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6) else None


class FastLayerMixin(FastMixin):
    """Mixed in front of a BERT-style Layer class (see apply_fastpath)."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        mode = self.__dict__.get("_sparse_ofa_layer_mode")
        if mode == "off" or not _eligible(self, args, kwargs):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        mine = _lean_forward(self, hidden_states, attention_mask)
        if mode is None:  # first call: check against the model's own forward, learn its return type
            theirs = super().forward(hidden_states, attention_mask, *args, **kwargs)
            self.__dict__["_sparse_ofa_layer_mode"] = _same(mine, theirs) or "off"
            return theirs
        return mine if mode == "tensor" else (mine,)


def is_lean_layer(module: nn.Module) -> bool:
    """A BERT-style encoder layer (attention.self with the fast path, output/intermediate dense)."""
    mods = module._modules
    attention = mods.get("attention")
    if attention is None or not all(m in mods for m in _CONTAINERS):
        return False
    self_attn, self_output = attention._modules.get("self"), attention._modules.get("output")
    return (isinstance(self_attn, FastSelfAttentionMixin)
            and not getattr(attention, "is_cross_attention", False)
            and not getattr(module, "is_decoder", False)
            and not getattr(module, "add_cross_attention", False)
            and getattr(module, "chunk_size_feed_forward", 0) == 0
            and all(hasattr(self_output, a) for a in ("dense", "LayerNorm"))
            and all(hasattr(mods["intermediate"], a) for a in ("dense", "intermediate_act_fn"))
            and all(hasattr(mods["output"], a) for a in ("dense", "LayerNorm")))
