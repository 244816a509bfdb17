"""Pattern lock: keep a sparse model's zeros at zero while it is fine-tuned (or quantization-trained).

    lock = PatternLock(model)          # masks = (W != 0) of every selected Linear weight, now
    ...  loss.backward(); optimizer.step(); lock.apply()

Two mechanisms, both needed: a gradient hook zeroes the gradient of every pruned weight (so plain SGD
never moves it), and `apply()` after every optimizer step zeroes pruned weights again (Adam's momentum
or weight decay could otherwise revive them). The masks after fine-tuning are the masks at load, bit
for bit.

`MaskedWeights` is the shared machinery (also used by the GMP `Pruner`): a set of Linear weights,
one bool keep-mask per weight, gradient hooks and the in-place application of the masks.
"""
from __future__ import annotations

import torch
from torch import nn

from .ddp import unwrap
from ..selection import FilterFn, default_prune_filter  # noqa: F401 (default_prune_filter re-exported)


def select_linears(model: nn.Module, filter_fn: FilterFn | None, who: str) -> dict[str, nn.Linear]:
    """{qualified name: Linear} chosen by filter_fn (default: default_prune_filter); error if none."""
    select = filter_fn or default_prune_filter
    chosen = {name: m for name, m in unwrap(model).named_modules()
              if name and isinstance(m, nn.Linear) and select(m, name)}
    if not chosen:
        raise ValueError(f"{who}: no Linear layer matched the filter; pass filter_fn=lambda module, "
                         "name: ... for a model without a BERT-style encoder")
    return chosen


class MaskedWeights:
    """Bool keep-masks over the weights of selected Linear layers, enforced on grads and weights."""

    def __init__(self, model: nn.Module, filter_fn: FilterFn | None, who: str):
        self.layers = select_linears(model, filter_fn, who)
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks = []
        for name, layer in self.layers.items():
            # the hook looks the mask up at call time, so replacing a mask needs no re-registration;
            # a frozen weight gets no gradient to mask (apply_masks still zeroes it)
            if layer.weight.requires_grad:
                self._hooks.append(layer.weight.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str):
        def zero_pruned(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks.get(name)
            return grad if mask is None else grad * mask.to(grad.device, grad.dtype)
        return zero_pruned

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight in place (call after every optimizer step)."""
        for name, mask in self.masks.items():
            weight = self.layers[name].weight
            if mask.device != weight.device:
                mask = self.masks[name] = mask.to(weight.device)
            weight.mul_(mask)

    def report(self) -> dict[str, float]:
        """{layer name: fraction of its weights pruned by the mask}."""
        return {name: 1.0 - float(mask.float().mean()) for name, mask in self.masks.items()}

    def format_report(self, target: float | None = None) -> str:
        return format_report(self.report(), target)

    def overall_sparsity(self) -> float:
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / max(sum(m.numel() for m in self.masks.values()), 1)

    def _masks_state(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def _load_masks(self, masks: dict[str, torch.Tensor], who: str) -> None:
        if set(masks) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(masks)), sorted(set(masks) - set(self.layers))
            raise ValueError(f"{who}.load_state_dict: masks do not match the selected layers "
                             f"(missing {missing}, unexpected {extra})")
        for name, mask in masks.items():
            weight = self.layers[name].weight
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"{who}.load_state_dict: mask {name} has shape {tuple(mask.shape)}, "
                                 f"the weight {tuple(weight.shape)}")
            self.masks[name] = mask.to(device=weight.device, dtype=torch.bool).clone()
        self.apply_masks()


def format_report(report: dict[str, float], target: float | None = None) -> str:
    """A per-layer sparsity table from `report()` ({name: sparsity}), with the mean at the bottom."""
    if not report:
        return "(no layers)"
    width = max(len(n) for n in report)
    lines = [f"{'layer':<{width}}  sparsity"]
    lines += [f"{name:<{width}}  {value:>8.2%}" for name, value in report.items()]
    mean = sum(report.values()) / len(report)
    tail = f"{len(report)} layers, mean sparsity {mean:.2%}"
    if target is not None:
        tail += f" (target {target:.2%})"
    return "\n".join(lines + [tail])


class PatternLock(MaskedWeights):
    """Freeze the current zero pattern of the selected Linear weights (default: default_prune_filter).

    masks[name] = (weight != 0) at construction. Call `apply()` after every optimizer step.
    """

    def __init__(self, model: nn.Module, filter_fn: FilterFn | None = None):
        super().__init__(model, filter_fn, "PatternLock")
        self.masks = {name: (layer.weight.detach() != 0) for name, layer in self.layers.items()}

    def apply(self) -> None:
        self.apply_masks()

    def state_dict(self) -> dict:
        return {"masks": self._masks_state()}

    def load_state_dict(self, state: dict) -> None:
        self._load_masks(state["masks"], "PatternLock")


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned (False) entries over all the keep-masks together."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)
