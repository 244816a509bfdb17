"""The optimizer and the learning-rate schedules that the demo and the training commands use.

    optimizer = adamw(student, lr=1e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup=100, total=1000))

`warmup_linear_decay` is the usual BERT fine-tuning schedule (the training commands). `gmp_lr_factor`
is the Prune OFA demo's: during the GMP ramp the learning rate follows the sparsity target, so the
student is moved gently while little has been pruned and at full rate once pruning bites.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, *, weight_decay: float = 0.0, eps: float = 1e-8,
          fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (frozen ones are left out).

    weight_decay applies to matrices only (biases and LayerNorm weights, dim < 2, get none: two param
    groups); with weight_decay 0 all parameters form one group. fused: one kernel over all parameters
    where this torch has the fused implementation for their device, else the default one."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if weight_decay:
        groups = [{"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in trainable], "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)
        except (RuntimeError, TypeError):  # no fused AdamW in this torch / for this device
            pass
    return torch.optim.AdamW(groups, lr=lr, eps=eps)


def warmup_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier of step (LambdaLR): linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def gmp_lr_factor(step: int, steps: int, warmup: int, schedule=None, kind: str = "sparsity",
                  floor: float = 0.05) -> float:
    """The multiplier of the peak LR at `step` of `steps`: linear warm-up; through the GMP ramp of
    `schedule` (a GMPSchedule) flat ("flat") or following the sparsity target,
    max(floor, s(step + 1) / s_final) ("sparsity"); after the ramp a linear decay to 10 %. Without a
    schedule (QAT) there is no ramp: warm-up, then the decay."""
    ramp_end = schedule.ramp_end if schedule is not None else 0
    ramp = 1.0
    if schedule is not None and step < ramp_end and kind == "sparsity":
        # at 0 % sparsity the full LR only moves the student away from its teacher (the running cosine
        # fell from 1.0 to ~0.7 in 20 steps at 2e-3): the LR grows as pruning removes weights
        ramp = max(floor, schedule.sparsity_at(step + 1) / max(schedule.final_sparsity, 1e-8))
    if step < warmup:
        return ramp * (step + 1) / warmup
    if step < ramp_end:
        return ramp
    return max(0.1, 1.0 - 0.9 * (step - ramp_end) / max(1, steps - ramp_end))


__all__ = ["adamw", "gmp_lr_factor", "warmup_linear_decay"]
