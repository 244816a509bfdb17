"""Magnitude masks: which weights a layer keeps at a given sparsity and pattern.

Per-layer threshold: exactly round(sparsity * units) units are pruned in every layer, the units with
the smallest score, ties broken by position. Units and scores per pattern:
    "unstructured"  one weight, score |w|
    "1x4"           4 consecutive input channels of one row, score = L2 norm of the block
    "2:4"           one weight, but only the 2 smallest |w| of each group of 4 are candidates, so
                    sparsity 0.5 gives exact 2:4; sparsity above 0.5 is impossible.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import check_pattern
from .selection import is_encoder_linear


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool keep-mask with the `count` lowest scores set False (stable: earlier index pruned first,
    NaN above everything, as a stable argsort orders them).

    A selection, not a sort: the count-th smallest score v (kthvalue, linear time) splits the scores
    into those below v (all pruned) and those equal to v (the earliest ones pruned until `count` is
    reached). Same mask as the stable argsort, ~10x faster on a 384x1536 layer (5 ms, not 50 ms),
    which GMP pays for every layer at every mask update."""
    flat = scores.flatten()
    if count <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if count >= flat.numel():
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    v = flat.kthvalue(count).values
    nan = flat.isnan()
    below, equal = (~nan, nan) if v.isnan() else (flat < v, flat == v)
    keep = ~below
    ties = equal.nonzero().flatten()[:count - int(below.sum())]
    keep[ties] = False
    return keep.view(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """bool [N, K] keep-mask of `weight` at `sparsity` for `pattern` (see module doc)."""
    check_sparsity(sparsity)
    check_pattern(pattern)
    w = weight.detach().abs().to(torch.float32)
    n, k = w.shape
    if pattern != "unstructured" and k % 4:
        raise ValueError(f"pattern {pattern!r} needs in_features divisible by 4, got {k}")
    if pattern == "unstructured":
        return _prune_lowest(w, round(sparsity * w.numel()))
    if pattern == "1x4":
        block_norm = w.view(n, k // 4, 4).norm(dim=-1)
        keep = _prune_lowest(block_norm, round(sparsity * block_norm.numel()))
        return keep.repeat_interleave(4, dim=1)
    if sparsity > 0.5:
        raise ValueError(f"pattern '2:4' keeps half the weights; sparsity {sparsity} > 0.5 is impossible")
    groups = w.view(n, k // 4, 4)
    # the two largest of each group are never candidates: give them +inf score
    top2 = groups.topk(2, dim=-1).indices
    scores = groups.clone().scatter_(-1, top2, float("inf"))
    return _prune_lowest(scores, round(sparsity * w.numel())).view(n, k)


@torch.no_grad()
def magnitude_prune_(model: nn.Module, sparsity: float, pattern: str = "unstructured",
                     filter_fn=None) -> dict[str, float]:
    """One-shot magnitude pruning of the selected Linear weights, in place; {name: sparsity}."""
    select = filter_fn or is_encoder_linear
    result = {}
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Linear) and select(module, name):
            mask = magnitude_mask(module.weight, sparsity, pattern)
            module.weight.mul_(mask)
            result[name] = 1.0 - float(mask.float().mean())
    if not result:
        raise ValueError("magnitude_prune_: no Linear layer matched")
    return result
