"""Lean forward for a BERT-style (or DistilBERT) encoder layer whose self-attention has the fast path.

The model's own layer forward spends ~50-100 us of Python per layer on the way to its ~10 ops:
kwarg-deprecation wrappers, four container modules (attention, self-output, intermediate, output),
three eval-mode dropouts and `apply_chunking_to_forward` (which calls inspect.signature every time).
This forward calls the leaf modules directly in the model's own order (BERT names; DistilBERT's
TransformerBlock: attention (holding out_lin), sa_layer_norm, ffn.lin1 / activation / lin2,
output_layer_norm; `LayerLayout` below):

    a  = attention.self(h, mask)                       (the fast fused-QKV attention)
    h1 = attention.output.LayerNorm(attention.output.dense(a) + h)
    h2 = output.LayerNorm(output.dense(intermediate.act(intermediate.dense(h1))) + h1)
                                                       (one sparse_ofa.ffn call when fused)

Leaf modules with hooks are called as modules, so their hooks run; unhooked ones are called for
less Python: the attention's fast_attention, and SparseInt8Linear.direct (one op per linear) with
the residual add + LayerNorm (attention output, FFN output) and the GELU (FFN input) as the
kernel's post-ops where the backend runs them (AVX-512, AVX2; within ~1e-6 of torch's ops), torch's
ops otherwise, and the whole feed-forward block as one op (sparse_ofa/fastpath/ffn.py) where it can be.
What it calls is resolved once per layer (`_Route`) and re-validated each call by identity and
hook-emptiness tests: Python between the kernels runs with cold caches, and re-deriving it cost
~15 µs per layer. It steps aside (the model's forward runs) while training, under tracing, with a
cache or cross-attention, with feed-forward chunking, when a skipped container module has hooks, and
for good if its first call (run both ways) does not match the model's own forward, whose return
structure (tensor or 1-tuple) it then copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass

from ..modules import SparseInt8Linear
from .attention import FastDistilSelfAttentionMixin, FastSelfAttentionMixin
from .ffn import feed_forward
from .guards import FastMixin, first_call, has_hooks, lean_or_own, traced_or_hooked_globally, uses_cache


@dataclass(frozen=True)
class LayerLayout:
    """Where a kind of encoder layer keeps what the lean forward calls (dotted paths from the layer)."""
    attention: str             # the self-attention module (with the fast path)
    attention_type: type       # ... its fast-path mixin
    out_proj: str              # attention output projection
    out_proj_in_attention: bool  # the attention module's own forward applies out_proj (DistilBERT)
    attn_norm: str             # LayerNorm after the attention block's residual add
    ffn_in: str
    act: str                   # the activation module (or function attribute) between them
    ffn_out: str
    out_norm: str              # LayerNorm after the feed-forward block's residual add
    skipped: tuple[str, ...]   # containers whose forward the lean forward skips: hooks there stop it
    chunking: str              # the module whose chunk_size_feed_forward must be 0 ("": the layer)

    def paths(self) -> tuple[str, ...]:
        return (self.attention, self.out_proj, self.attn_norm, self.ffn_in, self.act, self.ffn_out,
                self.out_norm)


BERT_LAYOUT = LayerLayout("attention.self", FastSelfAttentionMixin, "attention.output.dense", False,
                          "attention.output.LayerNorm", "intermediate.dense", "intermediate.intermediate_act_fn",
                          "output.dense", "output.LayerNorm", ("attention", "attention.output", "intermediate", "output"),
                          "")
DISTILBERT_LAYOUT = LayerLayout("attention", FastDistilSelfAttentionMixin, "attention.out_lin", True, "sa_layer_norm",
                                "ffn.lin1", "ffn.activation", "ffn.lin2", "output_layer_norm", ("ffn",), "ffn")


def _links(layer: nn.Module, path: str) -> list[tuple[dict, str, object]]:
    """(parent's _modules or __dict__, name, child) for each step of a dotted path; KeyError if absent.
    A replaced module shows as another child in its parent's dict."""
    links, node = [], layer
    for name in path.split("."):
        if not isinstance(node, nn.Module):
            raise KeyError(path)
        where = node._modules if name in node._modules else node.__dict__
        node = where[name]
        links.append((where, name, node))
    return links


def _node(layer: nn.Module, path: str):
    return _links(layer, path)[-1][2]


def _eligible(layer: nn.Module, args, kwargs) -> bool:
    if (layer.training or traced_or_hooked_globally()
            or kwargs.get("output_attentions") or uses_cache(args, kwargs)):
        return False
    if _route(layer) is not None:  # nothing hooked in the layer
        return True
    return not any(has_hooks(_node(layer, path)) for path in layer._sparse_ofa_layout.skipped)


class _Route:
    """What one layer's lean forward calls, resolved once: the leaf modules, and whether the attention
    output and the feed-forward block run as fused kernel calls. Python between the kernels runs with
    cold caches (~3-5x its warm timeit cost): re-deriving this every call cost ~15-25 µs per layer,
    checking that it still holds costs a dozen identity and emptiness tests. Only built while nothing
    in the layer has hooks; rebuilt when a module is replaced, a hook appears or `fuse` changes."""

    def __init__(self, layer: nn.Module, watched: tuple, links: tuple, leaves: tuple):
        self.links, self.watched, self.fuse = links, watched, layer._sparse_ofa_fuse
        self.self_attn, self.ao, self.ao_norm, self.ffn1, self.act, self.ffn2, self.out_norm = leaves
        self.projects = layer._sparse_ofa_layout.out_proj_in_attention
        fuse = self.fuse
        self.ao_fused = fuse and _plain_sparse(self.ao) and _plain_layer_norm(self.ao_norm, self.ao.out_features)
        self.ffn_fused = (fuse and _plain_sparse(self.ffn1) and _plain_sparse(self.ffn2) and _is_erf_gelu(self.act)
                          and _plain_layer_norm(self.out_norm, self.ffn2.out_features)
                          and self.ffn1.out_features == self.ffn2.in_features)

    @classmethod
    def for_one_call(cls, layer: nn.Module) -> "_Route":
        """The leaves as they are now, for one call while modules of the layer have hooks (never
        cached: hooked modules are called as modules, so their hooks run)."""
        leaves = tuple(_node(layer, path) for path in layer._sparse_ofa_layout.paths())
        return cls(layer, (), (), leaves)

    def current(self, layer: nn.Module) -> bool:
        if layer._sparse_ofa_fuse != self.fuse:
            return False
        for parent, name, child in self.links:
            if parent.get(name) is not child:
                return False
        for module in self.watched:
            if module._forward_hooks or module._forward_pre_hooks:
                return False
        return True


def _route(layer: nn.Module) -> _Route | None:
    """The layer's current _Route, or None while any module it calls (or skips) has hooks."""
    route = layer.__dict__.get("_sparse_ofa_route")
    if route is not None and route.current(layer):
        return route
    links, seen = [], set()
    per_path = [_links(layer, path) for path in layer._sparse_ofa_layout.paths()]
    for path_links in per_path:
        for link in path_links:
            if (id(link[0]), link[1]) not in seen:  # paths share their containers
                seen.add((id(link[0]), link[1]))
                links.append(link)
    watched = tuple({id(m): m for _, _, m in links if isinstance(m, nn.Module)}.values())
    leaves = tuple(path_links[-1][2] for path_links in per_path)
    route = None if any(has_hooks(m) for m in watched) else _Route(layer, watched, tuple(links), leaves)
    layer.__dict__["_sparse_ofa_route"] = route
    return route


def _plain_sparse(module: nn.Module) -> bool:
    return type(module) is SparseInt8Linear and not has_hooks(module)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), as SparseInt8Linear.direct (one op) when nothing hooks the module."""
    return module.direct(x) if _plain_sparse(module) else module(x)


def _plain_layer_norm(module: nn.Module, features: int) -> bool:
    return (type(module) is nn.LayerNorm and not has_hooks(module) and module.weight is not None
            and tuple(module.normalized_shape) == (features,))


def _layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), as the op itself for a plain, unhooked nn.LayerNorm (what its forward calls)."""
    if type(module) is nn.LayerNorm and not has_hooks(module):
        p = module._parameters
        return torch.layer_norm(x, module.normalized_shape, p["weight"], p["bias"], module.eps)
    return module(x)


def _is_erf_gelu(act) -> bool:
    """HF's GELUActivation computing F.gelu (erf form), unhooked."""
    return (type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu
            and not has_hooks(act))


def _dense_add_norm(dense: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                    fuse: bool) -> torch.Tensor:
    """norm(dense(x) + residual): one kernel call (add and LayerNorm as its post-ops) where it can be."""
    if fuse and _plain_sparse(dense) and _plain_layer_norm(norm, dense.out_features):
        p = norm._parameters
        return dense.direct(x, residual=residual, norm=(p["weight"], p["bias"], norm.eps))
    return _layer_norm(norm, _linear(dense, x) + residual)


def _dense_act(dense: nn.Module, x: torch.Tensor, act, fuse: bool) -> torch.Tensor:
    """act(dense(x)): one kernel call (GELU as its post-op) where it can be."""
    if fuse and _plain_sparse(dense) and _is_erf_gelu(act):
        return dense.direct(x, gelu=True)
    return act(_linear(dense, x))


_LOOKUP = object()


def _lean_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask, route=_LOOKUP) -> torch.Tensor:
    """The layer's forward as the module doc writes it. route: the layer's _Route if the caller has
    just checked it, else looked up; while a module of the layer has hooks there is none, and this
    call resolves its own (for_one_call)."""
    if route is _LOOKUP:
        route = _route(layer)
    if route is None:
        route = _Route.for_one_call(layer)
    self_attn = route.self_attn
    attn = None
    if not self_attn.training and not has_hooks(self_attn):
        attn = self_attn.fast_attention(hidden_states, attention_mask)
    if attn is None:  # the attention module's own forward (which may hold the output projection)
        h1 = _own_attention_block(self_attn, route.projects, route.ao, route.ao_norm, hidden_states,
                                  attention_mask, route.fuse)
    elif route.ao_fused:
        p = route.ao_norm._parameters
        h1 = route.ao.direct(attn, residual=hidden_states, norm=(p["weight"], p["bias"], route.ao_norm.eps))
    else:
        h1 = _dense_add_norm(route.ao, attn, hidden_states, route.ao_norm, route.fuse)
    if route.ffn_fused:  # the whole feed-forward block as one call (fastpath/ffn.py)
        p = route.out_norm._parameters
        return feed_forward(route.ffn1, route.ffn2, h1, residual=h1, norm=(p["weight"], p["bias"], route.out_norm.eps))
    return _dense_add_norm(route.ffn2, _dense_act(route.ffn1, h1, route.act, route.fuse), h1, route.out_norm,
                           route.fuse)


def _own_attention_block(self_attn: nn.Module, projects: bool, ao: nn.Module, ao_norm: nn.Module,
                         hidden_states: torch.Tensor, attention_mask, fuse: bool) -> torch.Tensor:
    """ao_norm(ao(attention) + h) with the attention module called as a module (hooks run)."""
    attn = self_attn(hidden_states, attention_mask)[0]
    if projects:  # its forward applied the output projection already
        return _layer_norm(ao_norm, attn + hidden_states)
    return _dense_add_norm(ao, attn, hidden_states, ao_norm, fuse)


def _same(mine: torch.Tensor, theirs) -> str | None:
    """'tensor' or 'tuple' if the model's output `theirs` holds `mine`; None if it does not."""
    if isinstance(theirs, tuple) and len(theirs) == 1:
        kind, theirs = "tuple", theirs[0]
    else:
        kind = "tensor"
    if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
        return None
    # A wrong lean forward is off by O(1) everywhere. The fused post-ops differ from torch's ops by
    # ~1e-6 (LayerNorm statistics summed in another order, GELU's erf), and such a difference can tip
    # a per-token int8 rounding in the next linear: a few outputs then move by one quantization
    # step (~1e-3). So: relative L2 distance, not an elementwise tolerance.
    diff = float((mine - theirs).detach().norm())  # (detached: a first call may run with grad enabled)
    return kind if diff <= 1e-3 * float(theirs.detach().norm()) else None


class FastLayerMixin(FastMixin):
    """Mixed in front of a BERT-style Layer class (see apply_fastpath)."""

    _sparse_ofa_fuse = True
    _sparse_ofa_layout = BERT_LAYOUT

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        def own():
            return super(FastLayerMixin, self).forward(hidden_states, attention_mask, *args, **kwargs)

        mode = self.__dict__.get("_sparse_ofa_layer_mode")
        if mode == "off" or not _eligible(self, args, kwargs):
            return own()
        # _eligible has just brought the route up to date
        route = self.__dict__.get("_sparse_ofa_route")

        def lean():
            mine = _lean_forward(self, hidden_states, attention_mask, route)
            return mine if mode != "tuple" else (mine,)
        if mode is None:  # first call: check against the model's own forward, learn its return type
            return first_call(self, "_sparse_ofa_layer_mode", lean, own, _same)
        return lean_or_own(self, "_sparse_ofa_layer_mode", lean, own)


class FastDistilLayerMixin(FastLayerMixin):
    """Mixed in front of DistilBERT's TransformerBlock (see apply_fastpath)."""

    _sparse_ofa_layout = DISTILBERT_LAYOUT


def lean_layer_mixin(module: nn.Module) -> type | None:
    """The lean-forward mixin for an encoder layer of a known layout whose self-attention has the fast
    path (BERT-style or DistilBERT), None for any other module."""
    for mixin in (FastLayerMixin, FastDistilLayerMixin):
        layout = mixin._sparse_ofa_layout
        try:
            self_attn, ao, ao_norm, ffn1, act, ffn2, out_norm = (_node(module, p) for p in layout.paths())
            chunking = _node(module, layout.chunking) if layout.chunking else module
            skipped = [_node(module, p) for p in layout.skipped]
        except (KeyError, AttributeError):
            continue
        if (type(self_attn).__mro__[1] is layout.attention_type
                and all(isinstance(m, nn.Module) for m in (ao, ao_norm, ffn1, ffn2, out_norm, *skipped))
                and callable(act)
                and not any(getattr(m, "is_cross_attention", False) for m in skipped)
                and not getattr(module, "is_decoder", False)
                and not getattr(module, "add_cross_attention", False)
                and getattr(chunking, "chunk_size_feed_forward", 0) == 0):
            return mixin
    return None
