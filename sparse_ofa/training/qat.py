"""Quantization-aware training (Q8BERT style) for the Linear layers Prune OFA sparsifies.

    prepare_qat(model)            # selected nn.Linear -> FakeQuantLinear, in place, same Parameters
    ... train with PatternLock + DistillLoss still on (observers learn activation ranges) ...
    convert_qat(model)            # FakeQuantLinear -> SparseInt8Linear with static activation scales

Weights: int8 symmetric. "per_channel" (default) is exactly sparse_ofa.formats.quantize_weight (scale =
amax(|W[n]|) / 127, round half even, clamp to [-127, 127]), so the converted layer holds bit for bit
the weights the model trained with. "per_tensor" (the paper's choice) uses one amax(|W|) / 127 for the
whole matrix while training; SparseInt8Linear stores per-channel scales, so convert re-quantizes the
float weight per channel: the converted model is then *more* precise than the fake-quant one and
matches it only within per-tensor quantization error (a looser tolerance, tested).

Activations (the Linear's input), one range per tensor, tracked by an EMA of the batch min / max in
training mode (`ema_decay`; the first batch initialises it) and frozen in eval mode:
  "uint8_asymmetric" (paper): range [min(lo, 0), max(hi, 0)], scale = (hi - lo) / 255,
      zero point z8 = round(-lo / scale) in [0, 255]. In int8 terms (what SparseInt8Linear runs):
      zero_point = z8 - 128, range [-128, 127] (the same grid shifted by 128).
  "int8_symmetric": scale = max(|lo|, |hi|) / 127, zero_point 0, range [-127, 127].
Fake quantization computes x_q = clamp(round(x * fp32(1 / s)) + z, qmin, qmax), x' = (x_q - z) * s, the
exact numerics of sparse_ofa.quant.quantize_static, so the converted model reproduces the fake-quant
model up to float summation order. Gradients: straight-through, zero where the input was clipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .ddp import unwrap
from .lock import FilterFn, select_linears
from ..quant import ActQuant, ieee_div

_WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
_ACTIVATIONS = ("uint8_asymmetric", "int8_symmetric")


@dataclass(frozen=True)
class QATConfig:
    weight_granularity: str = "per_channel"
    activation: str = "uint8_asymmetric"
    ema_decay: float = 0.99

    def __post_init__(self):
        if self.weight_granularity not in _WEIGHT_GRANULARITIES:
            raise ValueError(f"QATConfig: weight_granularity must be one of {_WEIGHT_GRANULARITIES}, "
                             f"got {self.weight_granularity!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"QATConfig: activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"QATConfig: ema_decay must be in [0, 1), got {self.ema_decay}")


def fake_quant_weight(weight: torch.Tensor, granularity: str = "per_channel") -> torch.Tensor:
    """Dequantized int8 weight (same dtype as `weight`), straight-through gradient."""
    w = weight.detach().to(torch.float32)
    if granularity == "per_channel":
        amax = w.abs().amax(dim=1, keepdim=True)
    else:
        amax = w.abs().amax().reshape(1, 1)
    scale = torch.where(amax > 0, ieee_div(amax, 127.0), torch.ones_like(amax))
    w_fq = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return weight + (w_fq.to(weight.dtype) - weight).detach()


class FakeQuantLinear(nn.Linear):
    """nn.Linear that trains with fake-quantized weights and inputs (see the module docstring).

    Buffers act_min / act_max / act_observed hold the EMA input range (they are saved, and DDP
    broadcasts them from rank 0 like any buffer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: QATConfig | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(config, self.weight.device)

    def _setup(self, config: QATConfig | None, device) -> None:
        self.qat_config = config or QATConfig()
        self.register_buffer("act_min", torch.zeros((), device=device))
        self.register_buffer("act_max", torch.zeros((), device=device))
        self.register_buffer("act_observed", torch.zeros((), dtype=torch.bool, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig | None = None) -> "FakeQuantLinear":
        """Wrap `linear`, sharing its weight and bias Parameters (optimizers and hooks stay valid)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module._setup(config, linear.weight.device)
        return module

    # ------------------------------------------------------------------ activation range
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        d = self.qat_config.ema_decay
        new_min = torch.where(self.act_observed, d * self.act_min + (1 - d) * lo, lo)
        new_max = torch.where(self.act_observed, d * self.act_max + (1 - d) * hi, hi)
        # where, not if: no host sync per forward
        self.act_min.copy_(torch.where(finite, new_min, self.act_min))
        self.act_max.copy_(torch.where(finite, new_max, self.act_max))
        self.act_observed.copy_(self.act_observed | finite)

    def act_qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(scale fp32 0-dim, zero_point in int8 terms 0-dim, qmin, qmax) from the current range."""
        lo = torch.clamp(self.act_min.float(), max=0.0)
        hi = torch.clamp(self.act_max.float(), min=0.0)
        if self.qat_config.activation == "uint8_asymmetric":
            scale = ieee_div(hi - lo, 255.0)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero_point = torch.clamp(torch.round(-lo / scale), 0, 255) - 128
            return scale, zero_point, -128, 127
        scale = ieee_div(torch.maximum(-lo, hi), 127.0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale), -127, 127

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point, qmin, qmax = self.act_qparams()
        inv_scale = (1.0 / scale.double()).float()  # = ActQuant.inv_scale, bit for bit
        raw = torch.round(x.float() * inv_scale) + zero_point
        x_fq = ((torch.clamp(raw, qmin, qmax) - zero_point) * scale).to(x.dtype)
        inside = (raw >= qmin) & (raw <= qmax)
        return x_fq.detach() + (x - x.detach()) * inside

    # ------------------------------------------------------------------ forward / export
    def weight_fake_quant(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.qat_config.weight_granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._observe(x)
        if bool(self.act_observed):
            x = self._fake_quant_input(x)
        return F.linear(x, self.weight_fake_quant(), self.bias)

    def sparse_ofa_act_quant(self) -> ActQuant:
        """The learned static activation quantization, in SparseInt8Linear's int8 terms (dynamic
        per-token instead where convert_qat was told so: `dynamic_activations`)."""
        if getattr(self, "dynamic_activations", False):
            return ActQuant()
        if not bool(self.act_observed):
            raise ValueError("FakeQuantLinear has observed no activations: run training (or calibration) "
                             "forward passes in train mode before convert_qat")
        scale, zero_point, qmin, qmax = self.act_qparams()
        return ActQuant(scale=float(scale), zero_point=int(zero_point), qmin=qmin, qmax=qmax)

    def extra_repr(self) -> str:
        cfg = self.qat_config
        return f"{super().extra_repr()}, weight={cfg.weight_granularity}, act={cfg.activation}"


def prepare_qat(model: nn.Module, config: QATConfig | None = None, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap the selected nn.Linear layers (default: encoder Linears + pooler) for FakeQuantLinear,
    in place, sharing Parameters (build the optimizer before or after: both work). Returns model."""
    config = config or QATConfig()
    base = unwrap(model)
    chosen = select_linears(base, filter_fn, "prepare_qat")
    for name, linear in chosen.items():
        if isinstance(linear, FakeQuantLinear):
            continue
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, FakeQuantLinear.from_linear(linear, config))
    return model


def convert_qat(model: nn.Module, backend: str = "auto", dynamic: Iterable[str] = ()) -> nn.Module:
    """Every FakeQuantLinear -> SparseInt8Linear with its learned static activation scale (weight zeros
    = sparsity pattern, detected per layer). Per-tensor QAT weights are re-quantized per channel.
    dynamic: names of layers to run with dynamic per-token activations instead (e.g. those
    sparse_ofa.training.outliers.outlier_layers finds, whose static range outliers have stretched)."""
    from ..sparsify import sparsify

    base = unwrap(model)
    fake = [name for name, m in base.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fake:
        raise ValueError("convert_qat: the model has no FakeQuantLinear layer; call prepare_qat first")
    dynamic = list(dynamic)
    unknown = sorted(set(dynamic) - set(fake))
    if unknown:
        raise ValueError(f"convert_qat: dynamic names {unknown} are not FakeQuantLinear layers of the model")
    for name in dynamic:
        base.get_submodule(name).dynamic_activations = True
    for name in fake:
        if name not in dynamic and not bool(base.get_submodule(name).act_observed):
            raise ValueError(f"convert_qat: {name} has observed no activations; run forward passes in train "
                             "mode (QAT or calibration) first")
    sparsify(base, filter_fn=lambda m, n: isinstance(m, FakeQuantLinear), backend=backend)
    return model


__all__ = ["FakeQuantLinear", "QATConfig", "convert_qat", "fake_quant_weight", "prepare_qat"]
