"""Lean forward for BERT-style embeddings (word + token type + position embeddings, LayerNorm).

The model's own forward runs ~10 ops (three lookups, a gather of the buffered token-type ids, two
adds that each allocate, LayerNorm, dropout) and its Python: ~350 µs per 128 tokens right after an
encoder forward (cold caches), 4 ops here (~220 µs):

    x = word[ids];  x += token_type[type_ids];  x += position[0 : S];  LayerNorm(x)

in the model's own addition order, so the result is the same bit for bit (dropout is the identity in
eval); RoBERTa-style embeddings (XLM-R, CamemBERT, ...) look their positions up with the module's own
padding-aware `create_position_ids_from_input_ids`. It steps aside (the model's forward runs) while
training, under tracing, with inputs_embeds, explicit position ids, a cache offset, hooks on the
module or its children, and for good if its first call (run both ways) does not match the model's
own output. DistilBERT's embeddings (word + position, LayerNorm; forward(input_ids, inputs_embeds,
position_ids)) the same way, without the token types.
"""

from __future__ import annotations

import torch
from torch import nn

from .guards import FastMixin, first_call, lean_or_own, own_forward_arguments, traced_or_hooked_globally

_PARTS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")


def lean_embeddings_mixin(module: nn.Module) -> type | None:
    """FastEmbeddingsMixin for word, position and token-type nn.Embedding + nn.LayerNorm (+ dropout),
    BERT-style embeddings; FastDistilEmbeddingsMixin for DistilBERT's (no token types); else None."""
    mods = module._modules
    if not (all(type(mods.get(name)) is nn.Embedding for name in _PARTS[:2])
            and type(mods.get("LayerNorm")) is nn.LayerNorm
            and set(mods) <= set(_PARTS) | {"dropout"}
            and mods["LayerNorm"].normalized_shape == (mods["word_embeddings"].embedding_dim,)):
        return None
    if type(mods.get("token_type_embeddings")) is nn.Embedding:
        return FastEmbeddingsMixin
    if "token_type_embeddings" not in mods and own_forward_arguments(module)[:3] in _DISTIL_ARGUMENTS:
        return FastDistilEmbeddingsMixin
    return None


# DistilBERT's embeddings forward, as spelled from transformers 5.0 on (the same positional meaning)
_DISTIL_ARGUMENTS = (("input_ids", "inputs_embeds", "position_ids"), ("input_ids", "input_embeds", "position_ids"))




def _eligible(module: nn.Module, input_ids, position_ids, inputs_embeds, args, kwargs) -> bool:
    if (module.training or args or position_ids is not None or inputs_embeds is not None
            or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or not all(v is None or (type(v) is int and v == 0) for v in kwargs.values())  # cache offsets
            or traced_or_hooked_globally()):
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    mods = module._modules
    if lean_embeddings_mixin(module) is not type(module).__mro__[1]:  # a part replaced since apply_fastpath
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in mods.values())


def _lean_embeddings(module: nn.Module, input_ids: torch.Tensor, token_type_ids) -> torch.Tensor:
    mods = module._modules
    seq = input_ids.shape[1]
    x = torch.embedding(mods["word_embeddings"].weight, input_ids)
    if "token_type_embeddings" in mods:
        if token_type_ids is None:  # the model's own default: its buffer of zeros, or zeros
            buffered = module._buffers.get("token_type_ids")
            token_type_ids = (buffered[:, :seq] if buffered is not None
                              else torch.zeros(seq, dtype=torch.long, device=input_ids.device))
        x.add_(torch.embedding(mods["token_type_embeddings"].weight, token_type_ids))
    # RoBERTa: positions count real tokens (__dict__, not getattr: a missing attribute costs nn.Module
    # an exception on every BERT forward)
    make_positions = getattr(type(module), "create_position_ids_from_input_ids", None)
    padding_idx = module.__dict__.get("padding_idx") if make_positions is not None else None
    if padding_idx is not None:
        x.add_(torch.embedding(mods["position_embeddings"].weight, make_positions(input_ids, padding_idx)))
    else:
        x.add_(mods["position_embeddings"].weight[:seq])
    norm = mods["LayerNorm"]
    return torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _same_embeddings(mine: torch.Tensor, theirs) -> str | None:
    same = (isinstance(theirs, torch.Tensor) and theirs.shape == mine.shape
            and torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6))
    return "on" if same else None


class FastEmbeddingsMixin(FastMixin):
    """Mixed in front of a BERT-style Embeddings class (see apply_fastpath)."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, *args, **kwargs):
        def own():
            return self._own_forward(input_ids, token_type_ids, position_ids, inputs_embeds, args, kwargs)
        return self._lean_or_own(own, input_ids, token_type_ids, position_ids, inputs_embeds, args, kwargs)

    def _lean_or_own(self, own, input_ids, token_type_ids, position_ids, inputs_embeds, args, kwargs):
        mode = self.__dict__.get("_sparse_ofa_embed_mode")
        if mode == "off" or not _eligible(self, input_ids, position_ids, inputs_embeds, args, kwargs):
            return own()
        def lean():
            return _lean_embeddings(self, input_ids, token_type_ids)
        if mode is None:  # first call: check against the model's own forward
            return first_call(self, "_sparse_ofa_embed_mode", lean, own, _same_embeddings)
        return lean_or_own(self, "_sparse_ofa_embed_mode", lean, own)

    def _own_forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, args, kwargs):
        if args:  # more positional arguments than the four named ones: pass all of them on in order
            return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds, *args, **kwargs)
        return super().forward(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)


class FastDistilEmbeddingsMixin(FastEmbeddingsMixin):
    """Mixed in front of DistilBERT's Embeddings: forward(input_ids, inputs_embeds, position_ids)."""

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, *args, **kwargs):
        if "input_embeds" in kwargs:  # transformers 5.0's spelling of the same (second) argument
            inputs_embeds = kwargs.pop("input_embeds")

        def own():
            return super(FastEmbeddingsMixin, self).forward(input_ids, inputs_embeds, position_ids, *args, **kwargs)
        return self._lean_or_own(own, input_ids, None, position_ids, inputs_embeds, args, kwargs)
