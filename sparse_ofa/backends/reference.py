"""The reference backend: the oracle every kernel is tested against.

Reads the canonical packed format directly (no derived layout), rebuilds the dense int8 weight and
multiplies in float64, which is exact for integers: every product is at most 2^14 in magnitude and
every partial sum stays below 2^53 for K < 2^39, so the float64 sum *is* the int32 sum.
"""
from __future__ import annotations

import torch

from ..formats import PackedWeight, unpack_int8
from .base import Backend


@torch.library.custom_op("sparse_ofa::reference_int_mm", mutates_args=())
def reference_int_mm(x_q: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                     row_offsets: torch.Tensor, scale: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    packed = PackedWeight(mask=mask, values=values, row_offsets=row_offsets, scale=scale, meta=meta)
    w_q = unpack_int8(packed)
    return (x_q.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.int32)


@reference_int_mm.register_fake
def _(x_q, mask, values, row_offsets, scale, meta):
    return x_q.new_empty((x_q.shape[0], mask.shape[0]), dtype=torch.int32)


class ReferenceBackend(Backend):
    name = "reference"

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        return packed.tensors()

    def int_mm(self, x_q, prepared):
        return torch.ops.sparse_ofa.reference_int_mm(
            x_q, prepared["mask"], prepared["values"], prepared["row_offsets"], prepared["scale"],
            prepared["meta"])
