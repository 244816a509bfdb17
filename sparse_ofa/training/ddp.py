"""Small helpers for running the training library under torch.distributed (torchrun / accelerate).

Everything here is a no-op in a single process, so the library code calls it unconditionally.
"""
from __future__ import annotations

import os

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


def setup_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that torchrun / accelerate launch describes (WORLD_SIZE > 1 in the
    environment, with RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); return this process's device.

    nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU. A single process returns its device and
    initialises nothing, so the same script runs with and without torchrun."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return device


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """model on `device`, wrapped in DistributedDataParallel when a process group is running.
    DDP broadcasts rank 0's parameters and buffers, so every rank starts from the same weights."""
    model = model.to(device)
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(items: list) -> list:
    """This rank's share of `items` (every world_size-th item, starting at rank)."""
    return items[rank()::world_size()]


def to_training_device(*models: nn.Module | None) -> torch.device:
    """Move the models (None skipped) to this process's device: its GPU under torchrun, the GPU of a
    single process when CUDA is there, else the CPU. Call it before building masks from them."""
    device = setup_distributed()
    for model in models:
        if model is not None:
            model.to(device)
    return device


def sharded_loader(features: list[dict], collate, batch_size: int, seed: int):
    """A re-iterable DataLoader that shuffles with its own seeded generator (train_prune_ofa replays
    it exactly on resume). Under torchrun each rank takes its own share (every world_size-th example)."""
    from torch.utils.data import DataLoader

    if not features:
        raise ValueError("no training examples")
    features = shard(features)
    if not features:
        raise ValueError(f"fewer training examples than the {world_size()} processes")
    return DataLoader(features, batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed), num_workers=0)


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
