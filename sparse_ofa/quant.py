"""Activation quantization and the dequantizing epilogue: the numerics every backend reproduces.

Dynamic (default), per token (row m of x [M, K]), symmetric int8, computed in float32:
    amax[m]      = max_k |x[m, k]|
    x_scale[m]   = amax[m] / 127                       (IEEE division; 0 where amax == 0)
    inv_scale[m] = fp32(1 / amax[m]) * 127             (two roundings; 0 where amax == 0)
    x_q[m, k]    = clamp(round_half_even(x[m, k] * inv_scale[m]), -127, 127)
Static (from QAT), one scale s and zero point z for the whole tensor, range [qmin, qmax] in int8:
    x_q[m, k]    = clamp(round_half_even(x[m, k] * fp32(1 / s)) + z, qmin, qmax),   x_scale[m] = s
Integer product (exact int32):  acc[m, n] = sum_k x_q[m, k] * w_q[n, k]
Epilogue, float32:  y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] + bias[n], cast to the output dtype.
A zero point z != 0 adds -z * sum_k w_q[n, k] to acc; modules fold it into the bias once
(see ActQuant.fold_zero_point), so kernels only ever see symmetric numerics.
A token with NaN/Inf activations gets a non-finite x_scale, so its output row is non-finite (as in
fp32), never silently finite garbage.

Input range: the epilogue's first product acc * x_scale reaches 127 * K * amax[m] (acc <= 127 * 127 * K,
x_scale = amax / 127), so it stays finite in float32 for |x| <= max_finite_input(K) = 2^127 / (127 K)
(half of float32's max, for rounding headroom): about 1.7e33 for K = 768 and 4.4e32 for K = 3072. A
row beyond that comes out Inf in every backend where fp32 F.linear (sum x * w) may still be finite.
Within it the output is finite whenever the true result is (the second product is the output's own
magnitude). Static (QAT) quantization clamps x first, so it has no such limit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActQuant:
    """How a module quantizes its input: dynamic per-token (scale None) or static (from QAT)."""

    scale: float | None = None
    zero_point: int = 0
    qmin: int = -127
    qmax: int = 127

    def __post_init__(self):
        if self.scale is not None:
            if not (self.scale > 0 and self.scale < float("inf")):
                raise ValueError(f"static activation scale must be finite and > 0, got {self.scale}")
            # the scale lives in a float32 buffer: hold exactly that value so save/load is lossless
            object.__setattr__(self, "scale", float(torch.tensor(self.scale, dtype=torch.float32)))
        if not -128 <= self.qmin <= self.zero_point <= self.qmax <= 127:
            raise ValueError(f"activation range needs -128 <= qmin <= zero_point <= qmax <= 127, "
                             f"got qmin={self.qmin} zero_point={self.zero_point} qmax={self.qmax}")
        if self.scale is None and (self.zero_point, self.qmin, self.qmax) != (0, -127, 127):
            raise ValueError("dynamic activation quantization is symmetric: zero_point 0, range [-127, 127]")

    @property
    def inv_scale(self) -> float:
        """1 / scale rounded to float32: the multiplier every backend uses."""
        return float(torch.tensor(1.0 / self.scale, dtype=torch.float32))

    def kernel_args(self) -> tuple[float, float, int, int, int]:
        """(static_scale, inv_scale, zero_point, qmin, qmax) as the C++ quantizer takes them;
        a zero scale means dynamic per-token quantization."""
        if not self.is_static:
            return (0.0, 0.0, 0, -127, 127)
        return (self.scale, self.inv_scale, self.zero_point, self.qmin, self.qmax)

    @property
    def is_static(self) -> bool:
        return self.scale is not None

    def describe(self) -> str:
        if not self.is_static:
            return "dynamic per-token int8"
        zp = f", zero_point={self.zero_point}" if self.zero_point else ""
        return f"static int8 (scale={self.scale:.4g}{zp})"

    def fold_zero_point(self, bias: torch.Tensor | None, w_q_rowsum: torch.Tensor,
                        w_scale: torch.Tensor) -> torch.Tensor | None:
        """Bias that absorbs the zero-point term: bias - s * w_scale * z * rowsum(w_q)."""
        if not self.is_static or self.zero_point == 0:
            return bias
        corr = self.scale * w_scale * (self.zero_point * w_q_rowsum.to(torch.float32))
        return (torch.zeros_like(w_scale) if bias is None else bias.to(torch.float32)) - corr


def max_finite_input(in_features: int) -> float:
    """Largest |x| for which dynamic quantization keeps every intermediate of the epilogue finite in
    float32 (see the module docstring, "Input range")."""
    return 2.0 ** 127 / (127 * max(int(in_features), 1))


def ieee_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor, one IEEE rounding on every device. A plain `t / 127.0` is a true division on
    CPU but t * fp32(1 / 127) on CUDA (a scalar divisor becomes a multiplication there), which
    differs in the last bit now and then; a 0-dim tensor divisor on t's device is divided on both.
    torch.full fills it on the device (no host copy), so CUDA graphs can capture this."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q int8 [M, K], x_scale float32 [M]); dynamic symmetric, see module doc."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    nonzero = amax != 0
    # torch evaluates `127.0 / t` as t.reciprocal() * 127 on every device: spelled out here
    inv_scale = torch.where(nonzero, amax.reciprocal() * 127.0, torch.zeros_like(amax))
    x_scale = torch.where(nonzero, ieee_div(amax, 127.0), torch.zeros_like(amax))
    x_q = torch.clamp(torch.round(xf * inv_scale[:, None]), -127, 127)
    # NaN would make the int8 cast undefined; its row's x_scale is already NaN.
    x_q = torch.nan_to_num(x_q, nan=0.0).to(torch.int8)
    return x_q, x_scale


def quantize_static(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q int8 [M, K], x_scale float32 [M]) with one static scale."""
    xf = x.to(torch.float32)
    x_q = torch.clamp(torch.round(xf * act.inv_scale) + act.zero_point, act.qmin, act.qmax)
    bad = ~torch.isfinite(xf).all(dim=-1)
    x_q = torch.nan_to_num(x_q, nan=0.0).to(torch.int8)
    x_scale = torch.full((xf.shape[0],), act.scale, dtype=torch.float32, device=x.device)
    x_scale = torch.where(bad, torch.full_like(x_scale, float("nan")), x_scale)
    return x_q, x_scale


def quantize_activations(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_static(x, act) if act.is_static else quantize_per_token(x)


def dequantize(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = acc * x_scale[:, None] * w_scale[None, :] + bias, in float32, cast to out_dtype."""
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
