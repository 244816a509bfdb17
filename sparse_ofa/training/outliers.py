"""Layers whose learned static activation range cannot hold their inputs.

QAT learns one activation range per layer (EMA of the batch min / max). Where a few outlier
activations stretch it, one int8 step swallows the typical values: after 12,000 Prune OFA steps,
all-MiniLM-L6-v2's first FFN output layer sees inputs spanning 66 with most of them below 1, its
static quantization error is 22x the dynamic per-token one, and that single layer costs 0.004 of
held-out cosine (bench/NOTES.md, "Why QAT lost 0.013"). Dynamic per-token quantization (the default
of `sparsify`, same kernels) sets the step from each token's own range instead.

    errors = static_vs_dynamic_error(model, calibration_batches)   # after QAT, before convert
    convert_qat(model, dynamic=outlier_layers(errors))              # those layers: dynamic per token
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .ddp import unwrap
from ..quant import quantize_per_token


@torch.no_grad()
def static_vs_dynamic_error(model: nn.Module, batches: Iterable[dict]) -> dict[str, tuple[float, float]]:
    """{FakeQuantLinear name: (static, dynamic)}: the relative input-quantization error
    sum ||x' - x||^2 / sum ||x||^2 over every batch (dicts of model inputs) of the layer's learned
    static quantization and of dynamic per-token int8. Runs the model in eval mode (observers frozen)
    and restores its mode."""
    from .qat import FakeQuantLinear

    base = unwrap(model)
    layers = {name: m for name, m in base.named_modules() if isinstance(m, FakeQuantLinear)}
    if not layers:
        raise ValueError("static_vs_dynamic_error: the model has no FakeQuantLinear layer; call prepare_qat first")
    unobserved = [name for name, m in layers.items() if not bool(m.act_observed)]
    if unobserved:
        raise ValueError(f"static_vs_dynamic_error: {unobserved[0]} has observed no activations; run QAT "
                         "(or calibration) forward passes in train mode first")
    sums = {name: [0.0, 0.0, 0.0] for name in layers}  # static, dynamic, energy (float64 on the host)

    def recorder(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x_q, x_scale = quantize_per_token(x)
            s = sums[name]
            s[0] += float(((module._fake_quant_input(x) - x).double() ** 2).sum())
            s[1] += float(((x_q.float() * x_scale[:, None] - x).double() ** 2).sum())
            s[2] += float((x.double() ** 2).sum())
        return record

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in layers.items()]
    was_training = base.training
    base.eval()
    seen = 0
    try:
        for batch in batches:
            base(**batch)  # (unwrapped: a DDP forward may broadcast, and calibration may run on one rank)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        base.train(was_training)
    if not seen:
        raise ValueError("static_vs_dynamic_error: no calibration batches")
    return {name: (s[0] / s[2], s[1] / s[2]) if s[2] > 0 else (0.0, 0.0) for name, s in sums.items()}


def outlier_layers(errors: dict[str, tuple[float, float]], ratio: float = 2.0, min_error: float = 1e-2) -> list[str]:
    """The layers whose static error is both large (> min_error: quantization noise above 1 % of the
    input's energy) and more than `ratio` times their dynamic per-token error. Both, because a layer
    QAT has adapted to its static grid gains nothing from dynamic quantization when the static error
    is small anyway (all-MiniLM-L6-v2's attention output layers: 7x dynamic, but 1.4e-3, and switching
    them cost 0.0003 each; the FFN output layers at 6.9e-2 and 1.1e-2 gained 0.0037 and 0.0007)."""
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if not min_error >= 0.0:
        raise ValueError(f"min_error must be >= 0, got {min_error}")
    return [name for name, (static, dynamic) in errors.items() if static > max(ratio * dynamic, min_error)]


__all__ = ["outlier_layers", "static_vs_dynamic_error"]
