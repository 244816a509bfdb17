"""The packed sparse-INT8 weight format (version 1): the one definition every backend reads.

A float weight W [N = out_features, K = in_features] whose zeros are the pruning pattern becomes:

    scale       float32 [N]                 symmetric per-output-channel scale, amax(|W[n]|) / 127
                                            (1.0 for an all-zero row)
    mask        uint8   [N, ceil(B / 8)]    bitmap of kept *blocks*, B = K / block blocks per row;
                                            bit b of byte j (LSB first) is block 8*j + b
    values      int8    [nnz_blocks*block]  int8 values of the kept blocks, row by row, blocks in
                                            ascending k, the `block` values of a block contiguous
    row_offsets int32   [N + 1]             values[row_offsets[n]:row_offsets[n+1]] is row n
    meta        int32   [5]                 (FORMAT_VERSION, N, K, pattern code, block)

    W_q[n, k] = round_half_even(W[n, k] / scale[n]) clamped to [-127, 127]

Blocks are 1 x `block` runs of consecutive input channels in one output row:
    "unstructured"  block = 1  any zero pattern
    "1x4"           block = 4  each run of 4 input channels (k = 4j .. 4j+3) is all kept or all zero;
                               matches VNNI's 4-element int8 dot product. Needs K % 4 == 0.
    "2:4"           block = 1  at most 2 non-zeros in each group of 4 input channels (sparse tensor
                               cores). Needs K % 4 == 0. Stored like unstructured; a GPU backend derives
                               its compressed 2:4 layout from this at pack time.
The mask comes from the float weight (W != 0): a kept weight that quantizes to 0 stays kept, as 0.
With 10 % of weights kept the packed weight takes 0.1 + 1/8 bytes per weight against 4 for fp32 (~18x).
Backends may derive their own layouts from this one, once, when a module is built (never on disk).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import ieee_div

FORMAT_VERSION = 1
PATTERNS = ("unstructured", "1x4", "2:4")
_PATTERN_CODE = {p: i for i, p in enumerate(PATTERNS)}
# int32 accumulation holds K * 128 * 128 without overflow up to this K.
MAX_IN_FEATURES = 2**31 // (128 * 128)
# 2:4 is only *detected* when it looks deliberate; sparser weights that happen to obey it are
# better served by the unstructured kernels.
_MIN_DENSITY_TO_DETECT_2_4 = 0.4


def block_of(pattern: str) -> int:
    check_pattern(pattern)
    return 4 if pattern == "1x4" else 1


def check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; expected one of {PATTERNS}")


@dataclass
class PackedWeight:
    """A weight in packed format v1 (see the module docstring for the byte layout)."""

    mask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    scale: torch.Tensor
    meta: torch.Tensor

    @property
    def version(self) -> int:
        return int(self.meta[0])

    @property
    def out_features(self) -> int:
        return int(self.meta[1])

    @property
    def in_features(self) -> int:
        return int(self.meta[2])

    @property
    def pattern(self) -> str:
        return PATTERNS[int(self.meta[3])]

    @property
    def block(self) -> int:
        return int(self.meta[4])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        """Stored values (kept blocks x block), including kept weights that quantized to 0."""
        return self.values.numel()

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / max(n * k, 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "values": self.values, "row_offsets": self.row_offsets,
                "scale": self.scale, "meta": self.meta}

    def to(self, device) -> "PackedWeight":
        return PackedWeight(**{k: v.to(device) for k, v in self.tensors().items()})

    def validate(self) -> "PackedWeight":
        """Check every invariant of format v1; raise ValueError naming the first one broken."""
        meta = self.meta
        if meta.dtype != torch.int32 or meta.shape != (5,):
            raise ValueError(f"packed weight meta must be int32 [5], got {meta.dtype} {tuple(meta.shape)}")
        if self.version != FORMAT_VERSION:
            raise ValueError(f"packed weight has format version {self.version}; this sparse_ofa reads "
                             f"version {FORMAT_VERSION} (re-pack the float weights with this version)")
        if not 0 <= int(meta[3]) < len(PATTERNS):
            raise ValueError(f"packed weight has unknown pattern code {int(meta[3])}")
        n, k, block = self.out_features, self.in_features, self.block
        if block != block_of(self.pattern):
            raise ValueError(f"packed weight block {block} does not match pattern {self.pattern!r}")
        nblocks = _ceil_div(k, block)
        for name, t, dtype, shape in (
            ("mask", self.mask, torch.uint8, (n, _ceil_div(nblocks, 8))),
            ("row_offsets", self.row_offsets, torch.int32, (n + 1,)),
            ("scale", self.scale, torch.float32, (n,)),
        ):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"packed weight {name} must be {dtype} {shape}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if self.values.dtype != torch.int8 or self.values.dim() != 1:
            raise ValueError(f"packed weight values must be a 1-D int8 tensor, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        kept = unpack_bits(self.mask, nblocks)
        counts = kept.sum(1, dtype=torch.int64) * block
        offsets = torch.zeros(n + 1, dtype=torch.int64, device=counts.device)
        offsets[1:] = counts.cumsum(0)
        if not torch.equal(offsets, self.row_offsets.to(torch.int64)):
            raise ValueError("packed weight row_offsets do not match the mask's kept-block counts")
        if int(offsets[-1]) != self.values.numel():
            raise ValueError(f"packed weight holds {self.values.numel()} values, mask says {int(offsets[-1])}")
        if not bool(torch.isfinite(self.scale).all()) or bool((self.scale <= 0).any()):
            raise ValueError("packed weight scales must be finite and positive")
        return self


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [N, B] -> uint8 [N, ceil(B/8)], bit b of byte j is column 8j+b."""
    n, b = bits.shape
    padded = torch.zeros(n, _ceil_div(b, 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :b] = bits
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.uint8))
    return (padded.view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 [N, ceil(B/8)] -> bool [N, B] (inverse of pack_bits)."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.view(mask.shape[0], -1)[:, :nbits].bool()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (w_q int8 [N, K], scale float32 [N])."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, ieee_div(amax, 127.0), torch.ones_like(amax))
    w_q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return w_q, scale


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out_features, in_features] tensor, "
                         f"got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    if weight.shape[1] > MAX_IN_FEATURES:
        raise ValueError(f"{name}: in_features {weight.shape[1]} exceeds {MAX_IN_FEATURES}, "
                         "where int32 accumulation could overflow")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name}: {bad} NaN/Inf values in the weight; sparse_ofa cannot quantize it")


def pattern_violation(nonzero: torch.Tensor, pattern: str) -> str | None:
    """Why the zero pattern `nonzero` (bool [N, K]) does not follow `pattern`, or None if it does."""
    check_pattern(pattern)
    n, k = nonzero.shape
    if pattern == "unstructured":
        return None
    if k % 4:
        return f"pattern {pattern!r} needs in_features divisible by 4, got {k}"
    counts = nonzero.view(n, k // 4, 4).sum(-1)
    if pattern == "1x4":
        bad = (counts != 0) & (counts != 4)
        what = "1x4 blocks that are partly zero (a block must be all kept or all pruned)"
    else:
        bad = counts > 2
        what = "groups of 4 with more than 2 non-zeros"
    if bool(bad.any()):
        row, grp = (int(i) for i in bad.nonzero()[0])
        return (f"{int(bad.sum())} {what}; first at row {row}, input channels "
                f"{4 * grp}..{4 * grp + 3}")
    return None


def detect_pattern(weight: torch.Tensor) -> str:
    """The most structured pattern the zeros of `weight` follow.

    "1x4" if every aligned run of 4 input channels is all zero or all non-zero (and some are zero);
    "2:4" if every group of 4 has at most 2 non-zeros and at least 40 % of weights are kept;
    "unstructured" otherwise (also for a fully dense weight).
    """
    nonzero = weight != 0
    if bool(nonzero.all()) or weight.shape[1] % 4:
        return "unstructured"
    if pattern_violation(nonzero, "1x4") is None:
        return "1x4"
    density = float(nonzero.float().mean())
    if density >= _MIN_DENSITY_TO_DETECT_2_4 and pattern_violation(nonzero, "2:4") is None:
        return "2:4"
    return "unstructured"


def pack(weight: torch.Tensor, pattern: str | None = None, *, name: str = "weight") -> PackedWeight:
    """Pack a float weight whose zeros are the sparsity pattern. `pattern=None` detects it."""
    check_weight(weight, name)
    w = weight.detach().to(torch.float32)
    if pattern is None:
        pattern = detect_pattern(w)
    check_pattern(pattern)
    nonzero = w != 0
    why = pattern_violation(nonzero, pattern)
    if why is not None:
        raise ValueError(f"{name}: the weight does not follow the {pattern!r} pattern: {why}")
    n, k = w.shape
    block = block_of(pattern)
    w_q, scale = quantize_weight(w)
    kept = nonzero.view(n, k // block, block).any(-1)
    values = w_q.view(n, k // block, block)[kept].reshape(-1).contiguous()
    row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
    row_offsets[1:] = (kept.sum(1) * block).cumsum(0)
    meta = torch.tensor([FORMAT_VERSION, n, k, _PATTERN_CODE[pattern], block], dtype=torch.int32)
    return PackedWeight(mask=pack_bits(kept), values=values, row_offsets=row_offsets.to(torch.int32),
                        scale=scale.contiguous(), meta=meta)


def unpack_int8(packed: PackedWeight) -> torch.Tensor:
    """The dense int8 weight W_q [N, K] (zeros where pruned). Exact."""
    n, k, block = packed.out_features, packed.in_features, packed.block
    kept = unpack_bits(packed.mask, k // block)
    dense = torch.zeros(n, k // block, block, dtype=torch.int8, device=packed.values.device)
    dense[kept] = packed.values.view(-1, block)
    return dense.view(n, k)


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dequantized dense float32 weight W_q * scale[:, None]. Exact inverse of what pack stored."""
    return unpack_int8(packed).to(torch.float32) * packed.scale[:, None]


def kept_mask(packed: PackedWeight) -> torch.Tensor:
    """bool [N, K]: the sparsity pattern (True = kept) at element granularity."""
    n, k, block = packed.out_features, packed.in_features, packed.block
    kept = unpack_bits(packed.mask, k // block)
    return kept.repeat_interleave(block, dim=1)


def concat_packed(parts: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights along the output rows: [N1 + N2 + ..., K], same K and pattern."""
    first = parts[0]
    if any(p.in_features != first.in_features or p.pattern != first.pattern for p in parts):
        raise ValueError("concat_packed needs the same in_features and pattern in every part")
    offsets, base = [first.row_offsets[:1]], 0
    for p in parts:
        offsets.append(p.row_offsets[1:] + base)
        base += p.values.numel()
    meta = first.meta.clone()
    meta[1] = sum(p.out_features for p in parts)
    return PackedWeight(mask=torch.cat([p.mask for p in parts]),
                        values=torch.cat([p.values for p in parts]),
                        row_offsets=torch.cat(offsets),
                        scale=torch.cat([p.scale for p in parts]),
                        meta=meta)
