"""Gradual magnitude pruning (Zhu & Gupta 2017) with per-layer exact sparsity, as Prune OFA uses it.

Schedule: from `start_step` t0 over `ramp_steps` (= n * dt) steps the target sparsity rises as

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / ramp_steps) ** 3        (clamped to t0 .. t0 + ramp)

and masks are recomputed every `update_every` (dt) steps from t0 until `end_step` (default: the end of
the ramp); the end of the ramp is always an update step, so the final sparsity is always reached.
Between updates (and after end_step) the masks are only enforced.

Step convention (also used by train_prune_ofa and the HF callback): `step` is the number of optimizer steps
already taken. Call `pruner.step(step)` *before* the forward pass of that step and
`pruner.apply_masks()` right after `optimizer.step()`.

Each update prunes every selected layer to exactly round(s(t) * units) units by magnitude
(sparse_ofa.masks.magnitude_mask: weights, 1x4 block L2 norms, or 2:4 groups). Pruned weights get zero
gradient (hook) and are re-zeroed after every optimizer step.

LR rewinding (option, `rewind_lr=True`): the learning rate of every param group at the first mask
update is remembered; at every later update during the ramp the optimizer's LRs are set back to it and,
when an LR scheduler is passed to `step`, the scheduler is rewound to where it was at that first update
(its `last_epoch`), so the schedule replays from there after each pruning step.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .ddp import broadcast_masks
from ..formats import check_pattern
from .lock import FilterFn, MaskedWeights, default_prune_filter, format_report  # noqa: F401 (re-exported)
from ..masks import magnitude_mask


@dataclass(frozen=True)
class GMPSchedule:
    """Cubic sparsity ramp; see the module docstring. Raises ValueError on impossible values."""

    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    ramp_steps: int = 1000
    update_every: int = 100
    end_step: int | None = None

    def __post_init__(self):
        for what, value in (("final_sparsity", self.final_sparsity), ("initial_sparsity", self.initial_sparsity)):
            if not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"GMPSchedule: {what} must be in [0, 1), got {value!r}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"GMPSchedule: initial_sparsity {self.initial_sparsity} exceeds final_sparsity "
                             f"{self.final_sparsity}; GMP only ever prunes more")
        for what, value, low in (("start_step", self.start_step, 0), ("ramp_steps", self.ramp_steps, 0),
                                 ("update_every", self.update_every, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"GMPSchedule: {what} must be an integer >= {low}, got {value!r}")
        if self.end_step is not None:
            if not isinstance(self.end_step, int) or self.end_step < self.start_step:
                raise ValueError(f"GMPSchedule: end_step {self.end_step!r} precedes start_step {self.start_step}")
            if self.end_step < self.ramp_end:
                raise ValueError(f"GMPSchedule: end_step {self.end_step} precedes the end of the ramp "
                                 f"(start_step + ramp_steps = {self.ramp_end}); the final sparsity would "
                                 "never be reached")

    @property
    def ramp_end(self) -> int:
        return self.start_step + self.ramp_steps

    @property
    def last_update_step(self) -> int:
        return self.ramp_end if self.end_step is None else self.end_step

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at `step` (the cubic formula, clamped to the ramp)."""
        if self.ramp_steps == 0:
            return self.final_sparsity if step >= self.start_step else self.initial_sparsity
        progress = min(max((step - self.start_step) / self.ramp_steps, 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Masks are recomputed at t0, t0 + dt, ... up to last_update_step, and at the ramp's end."""
        if step < self.start_step or step > self.last_update_step:
            return False
        return (step - self.start_step) % self.update_every == 0 or step == self.ramp_end

    def in_ramp(self, step: int) -> bool:
        return self.start_step <= step <= self.ramp_end


class Pruner(MaskedWeights):
    """GMP over the selected Linear weights (default_prune_filter: encoder Linears + pooler).

    Validates the pattern against every layer's shape and the schedule's final sparsity at
    construction, before any training step. `masks` start all-kept.
    """

    def __init__(self, model: nn.Module, schedule: GMPSchedule, pattern: str = "unstructured",
                 filter_fn: FilterFn | None = None, rewind_lr: bool = False):
        if not isinstance(schedule, GMPSchedule):
            raise TypeError(f"Pruner needs a GMPSchedule, got {type(schedule).__name__}")
        check_pattern(pattern)
        super().__init__(model, filter_fn, "Pruner")
        if pattern != "unstructured":
            bad = [f"{n} (in_features {m.in_features})" for n, m in self.layers.items() if m.in_features % 4]
            if bad:
                raise ValueError(f"Pruner: pattern {pattern!r} needs in_features divisible by 4; these layers "
                                 f"can't take it: {', '.join(bad)}")
        if pattern == "2:4" and schedule.final_sparsity != 0.5:
            raise ValueError(f"Pruner: pattern '2:4' keeps exactly half the weights (2 of every 4); "
                             f"final_sparsity must be 0.5, got {schedule.final_sparsity}")
        self.schedule, self.pattern, self.rewind_lr = schedule, pattern, rewind_lr
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.layers.items()}
        self.current_sparsity = 0.0
        self.last_update: int | None = None
        self._rewind_lrs: list[float] | None = None
        self._rewind_epoch: int | None = None

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> bool:
        """At an update step: recompute masks at the schedule's sparsity and apply them.

        Returns True if any mask changed. Under torch.distributed, rank 0's masks are broadcast.
        """
        if not self.schedule.is_update_step(step) or self.last_update == step:
            return False
        target = self.schedule.sparsity_at(step)
        new = {name: magnitude_mask(layer.weight, target, self.pattern) for name, layer in self.layers.items()}
        broadcast_masks(new)
        # the old masks may still sit where the model was built (moved to the GPU after the Pruner)
        changed = any(not torch.equal(new[n], self.masks[n].to(new[n].device)) for n in new)
        self.masks, self.current_sparsity, self.last_update = new, target, step
        self.apply_masks()
        if self.rewind_lr:
            self._rewind(step, optimizer, scheduler)
        return changed

    def _rewind(self, step: int, optimizer, scheduler) -> None:
        if optimizer is None:
            raise ValueError("Pruner(rewind_lr=True).step needs the optimizer to rewind its learning rate")
        if self._rewind_lrs is None:  # first update: remember where to rewind to
            self._rewind_lrs = [group["lr"] for group in optimizer.param_groups]
            self._rewind_epoch = getattr(getattr(scheduler, "scheduler", scheduler), "last_epoch", None)
            return
        if not self.schedule.in_ramp(step):
            return
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler
        if scheduler is not None and self._rewind_epoch is not None:
            scheduler.last_epoch = self._rewind_epoch
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = list(self._rewind_lrs)
        for group, lr in zip(optimizer.param_groups, self._rewind_lrs):
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"masks": self._masks_state(), "pattern": self.pattern, "schedule": asdict(self.schedule),
                "current_sparsity": self.current_sparsity, "last_update": self.last_update,
                "rewind_lrs": self._rewind_lrs, "rewind_epoch": self._rewind_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pattern", self.pattern) != self.pattern:
            raise ValueError(f"Pruner.load_state_dict: checkpoint pattern {state['pattern']!r} differs from "
                             f"this pruner's {self.pattern!r}")
        self._load_masks(state["masks"], "Pruner")
        self.current_sparsity = state.get("current_sparsity", 0.0)
        self.last_update = state.get("last_update")
        self._rewind_lrs = state.get("rewind_lrs")
        self._rewind_epoch = state.get("rewind_epoch")


def weight_sparsity(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, float]:
    """{layer: fraction of exactly-zero weights} over the selected Linear layers (no masks needed)."""
    select = filter_fn or default_prune_filter
    from .ddp import unwrap

    return {name: float((m.weight == 0).float().mean()) for name, m in unwrap(model).named_modules()
            if name and isinstance(m, nn.Linear) and select(m, name)}


__all__ = ["GMPSchedule", "Pruner", "default_prune_filter", "format_report", "weight_sparsity"]
