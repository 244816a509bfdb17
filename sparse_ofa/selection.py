"""Which Linear layers sparse_ofa touches: one home for layer selection.

A filter is `filter_fn(module, qualified_name) -> bool`. The defaults:
- `is_encoder_linear` (what `sparsify` swaps and `magnitude_prune_` prunes): nn.Linear modules inside
  a numbered transformer layer stack, i.e. whose qualified name contains `encoder.layer.<i>.` (BERT,
  RoBERTa, MiniLM, ELECTRA), `transformer.layer.<i>.` (DistilBERT) or `layers.<i>.`: attention
  q/k/v/output, intermediate and output projections. Never embeddings, LayerNorms, the pooler or
  task heads.
- `default_prune_filter` (what GMP training prunes, locks and quantization-trains): the same plus
  the pooler's dense layer, which is trained with the encoder.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]

_LAYER_STACK = re.compile(r"(^|\.)(encoder\.layer|transformer\.layer|layers?)\.\d+\.")
_POOLER = re.compile(r"(^|\.)pooler\.dense$")


def in_encoder_layer(name: str) -> bool:
    """Whether a module's qualified name lies inside a numbered encoder layer."""
    return _LAYER_STACK.search(name) is not None


def is_encoder_linear(module: nn.Module, name: str) -> bool:
    """An nn.Linear inside a numbered encoder layer."""
    return isinstance(module, nn.Linear) and in_encoder_layer(name)


def default_prune_filter(module: nn.Module, name: str) -> bool:
    """Every encoder Linear (attention q/k/v/output, intermediate, output) plus the pooler dense.

    Never embeddings, LayerNorms, biases (only `.weight` is masked) or task heads."""
    return isinstance(module, nn.Linear) and (is_encoder_linear(module, name) or bool(_POOLER.search(name)))
