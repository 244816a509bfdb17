"""Lean forward for a BERT-style base model (embeddings -> encoder layers -> pooler), or DistilBERT's.

Around ~0.5 ms of kernels (all-MiniLM-L6-v2, one sentence) the model's own forward spends ~100-150 us
of Python: four decorators (config defaults, output capturing, kwarg deprecation), the encoder module,
each layer's module and gradient-checkpointing wrappers, config lookups and two output objects. This
forward calls, in the model's own order:

    h = self.embeddings(input_ids, token_type_ids)        (a module call: hooks and lean forward apply)
    mask = encoder_mask(attention_mask)                    (None, or bool [B, 1, 1, S]: built here)
    h = lean_layer(h, mask) for each encoder layer         (sparse_ofa/fastpath/layer.py)
    return OwnOutput(last_hidden_state=h, pooler_output=self.pooler(h))

DistilBertModel (transformers 5) the same way: its embeddings(input_ids), the same mask, the lean
layers of `transformer`, its own output class. The mask is built here, not by transformers' private
builders (their signatures change between releases): what "sdpa" attention needs from a 2-D padding
mask is a few lines, and the first-call check below compares the result with the model's own.

It steps aside (the model's forward runs) while training, under tracing, with hooks on its encoder
(a hooked layer is called as a module), with any input beyond input_ids / attention_mask / token_type_ids or an option that changes
the output (output_attentions / output_hidden_states / return_dict=False, in the call or the config),
with a cache or cross-attention, with an attention implementation other than "sdpa" or a mask that
is not 2-D, and for good (with a FastPathWarning) if its first call (run both ways) does not match
the model's own output or any later call raises where the model's own forward does not.
"""
from __future__ import annotations

import torch
from torch import nn

from .guards import FastMixin, first_call, lean_or_own, traced_or_hooked_globally
from .layer import FastLayerMixin, _eligible as _layer_eligible, _lean_forward, _same

# options the lean forward honours as long as they ask for the default output
_DEFAULT_OPTIONS = {"output_attentions": (None, False), "output_hidden_states": (None, False),
                    "return_dict": (None, True), "use_cache": (None, False)}
_OUTPUTS = {"last_hidden_state", "pooler_output"}


def lean_model_mixin(module: nn.Module) -> type | None:
    """FastModelMixin for embeddings + an encoder of lean layers (+ pooler), FastDistilModelMixin for
    DistilBERT's embeddings + transformer of lean layers; else None."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    mods = module._modules
    for mixin in (FastModelMixin, FastDistilModelMixin):
        encoder = mods.get(mixin._sparse_ofa_encoder)
        layers = encoder._modules.get("layer") if encoder is not None else None
        if (set(mods) <= {"embeddings", mixin._sparse_ofa_encoder, "pooler"} and mods.get("embeddings") is not None
                and isinstance(layers, nn.ModuleList) and set(encoder._modules) == {"layer"} and len(layers) > 0
                and all(isinstance(layer, FastLayerMixin) for layer in layers)):
            return mixin
    return None


def encoder_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask an encoder's "sdpa" attention takes, from a 2-D padding mask (1 = token, 0 = padding):
    None where every token is kept, else bool [B, 1, 1, S] (True = attend), broadcast over the
    query rows and heads, which both torch's SDPA and sparse_ofa's attention kernels read."""
    if attention_mask is None:
        return None
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]


def _eligible(model: nn.Module, input_ids, attention_mask, args, kwargs) -> bool:
    config = model.config
    if (model.training or args or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or not (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                               and attention_mask.shape == input_ids.shape))
            or traced_or_hooked_globally()
            or getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False)
            or not getattr(config, "return_dict", True)):
        return False
    for key, value in kwargs.items():
        if value is not None and value not in _DEFAULT_OPTIONS.get(key, ()):
            return False
    if lean_model_mixin(model) is not type(model).__mro__[1]:  # a part replaced since apply_fastpath
        return False
    encoder = model._modules[model._sparse_ofa_encoder]  # (the model's own hooks run around either forward)
    return not (encoder._forward_hooks or encoder._forward_pre_hooks)


def _lean_model(model: nn.Module, input_ids: torch.Tensor, attention_mask, token_type_ids):
    mods = model._modules
    h = model.embed(input_ids, token_type_ids)
    mask = encoder_mask(attention_mask)
    for layer in mods[model._sparse_ofa_encoder]._modules["layer"]:
        if (layer.__dict__.get("_sparse_ofa_layer_mode") in ("tensor", "tuple")
                and not (layer._forward_hooks or layer._forward_pre_hooks)
                and _layer_eligible(layer, (), {})):  # (which also brings its route up to date)
            h = _lean_forward(layer, h, mask, layer.__dict__.get("_sparse_ofa_route"))
        else:  # not checked yet, off, or hooked: the layer module as the encoder calls it
            out = layer(h, mask)
            h = out[0] if isinstance(out, tuple) else out
    pooler = mods.get("pooler")
    return h, (pooler(h) if pooler is not None else None)


def _matches(mine, theirs) -> bool:
    """theirs: the model's own output holding exactly last_hidden_state (+ pooler_output) ~ mine."""
    keys = getattr(theirs, "keys", None)
    if keys is None or not set(keys()) <= _OUTPUTS or "last_hidden_state" not in set(keys()):
        return False
    if _same(mine[0], theirs["last_hidden_state"]) != "tensor":
        return False
    pooled = theirs.get("pooler_output")
    return (pooled is None) == (mine[1] is None) and (pooled is None or _same(mine[1], pooled) == "tensor")


class FastModelMixin(FastMixin):
    """Mixed in front of a BERT-style base model class (see apply_fastpath)."""

    _sparse_ofa_encoder = "encoder"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *args, **kwargs):
        def own():
            return super(FastModelMixin, self).forward(input_ids, attention_mask, token_type_ids, *args, **kwargs)
        return self._lean_or_own(own, input_ids, attention_mask, token_type_ids, args, kwargs)

    def embed(self, input_ids: torch.Tensor, token_type_ids) -> torch.Tensor:
        """The embeddings, as a module call (hooks and its lean forward apply)."""
        return self._modules["embeddings"](input_ids=input_ids, token_type_ids=token_type_ids)

    def _lean_or_own(self, own, input_ids, attention_mask, token_type_ids, args, kwargs):
        output_class = self.__dict__.get("_sparse_ofa_model_mode")
        if output_class == "off" or not _eligible(self, input_ids, attention_mask, args, kwargs):
            return own()

        def lean():
            return _lean_model(self, input_ids, attention_mask, token_type_ids)
        if output_class is None:  # first call: check against the model's own forward, learn its output
            # A layer's own first-call check returns the model's layer output, not its lean one (they
            # differ by int8 rounding flips, ~2 % relative L2 over six 90 %-sparse MiniLM layers):
            # after such checks, run the model once more, so that both sides use the layers as they
            # will run and give the same bits
            layers = self._modules[self._sparse_ofa_encoder]._modules["layer"]
            checking = any(layer.__dict__.get("_sparse_ofa_layer_mode") is None for layer in layers)

            def own_settled():
                theirs = own()
                return own() if checking else theirs
            return first_call(self, "_sparse_ofa_model_mode", lean, own_settled,
                              lambda mine, theirs: type(theirs) if _matches(mine, theirs) else None)

        def lean_output():
            mine = lean()
            if mine[1] is None:
                return output_class(last_hidden_state=mine[0])
            return output_class(last_hidden_state=mine[0], pooler_output=mine[1])
        return lean_or_own(self, "_sparse_ofa_model_mode", lean_output, own)


class FastDistilModelMixin(FastModelMixin):
    """Mixed in front of DistilBertModel (transformers 5): forward(input_ids, attention_mask,
    inputs_embeds, position_ids, ...), layers in `transformer`."""

    _sparse_ofa_encoder = "transformer"

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        def own():
            return super(FastModelMixin, self).forward(input_ids, attention_mask, *args, **kwargs)
        return self._lean_or_own(own, input_ids, attention_mask, None, args, kwargs)

    def embed(self, input_ids: torch.Tensor, token_type_ids) -> torch.Tensor:
        return self._modules["embeddings"](input_ids)
