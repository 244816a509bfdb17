"""Small helpers for running the training library under torch.distributed (torchrun / accelerate).

Everything here is a no-op in a single process, so the library code calls it unconditionally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel (or torch.compile) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def broadcast_masks(masks: dict[str, torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's masks with rank `src`'s, in place.

    DDP keeps the weights identical on all ranks, so masks computed from them already agree; this
    makes that a guarantee rather than a consequence of bit-identical all-reduce results.
    """
    if not is_distributed():
        return
    for mask in masks.values():
        # gloo broadcasts no bool tensors: go through uint8
        carrier = mask.to(torch.uint8)
        if dist.get_backend() == "nccl" and carrier.device.type != "cuda":
            carrier = carrier.cuda()
        dist.broadcast(carrier, src=src)
        mask.copy_(carrier.to(mask.device).bool())
