"""GPU layouts derived, once, from the canonical packed weight (sparse_ofa/formats.py, format v1).

Nothing here is a new on-disk format: each function reads a PackedWeight and returns the tensors a
kernel wants, on the packed weight's device. Pure torch, no Triton, so tests and prepare() on any
machine can build and check them.

Bitmap ("load as sparse") layout, K tiles of width `block_k` (K padded with pruned columns to KT tiles):
    bits     uint8 [KT, N, block_k / 8]  kept bit of (n, kt*block_k + 8j + b) is bit b of bits[kt, n, j]
    values   int8  [nnz]                 kept int8 values ordered (kt, n, k): every K tile is one
                                         contiguous segment, rows in order inside it, so the values of
                                         a tile of BLOCK_N consecutive rows are one contiguous run
    offsets  int32 [KT, N]               values[offsets[kt, n]:...] starts row n's part of tile kt
    W_q[n, kt*block_k + j] = values[offsets[kt, n] + sum_{i<j} bit(n, kt*block_k + i)] if bit else 0

Block-sparse layout, tiles of block_n x block_k:
    dense      int8  [N, K]      the dense int8 weight, row-major (K contiguous = K-major for the MMA)
    tile_ptr   int32 [NT + 1]    tiles of N-tile nt are tile_k[tile_ptr[nt]:tile_ptr[nt+1]]
    tile_k     int32 [nnz_tiles] K-tile indices (ascending) of tiles holding at least one kept weight

2:4 layout (sparse tensor cores), see csrc/cuda/sp24_int8.cu for the order the kernel reads:
    values  int8  [N, K/2]   the two kept values of each group of 4 (zero-filled if fewer were kept)
    meta    int32 [N, K/32]  per group of 4 a 4-bit field (idx1 << 2 | idx0, idx0 < idx1) saying where the
                             two values came from; 8 groups per 32-bit word, group g in bits 4g..4g+3
"""
from __future__ import annotations

import torch

from sparse_ofa.formats import PackedWeight, kept_mask, unpack_int8


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bitmap_layout(packed: PackedWeight, block_k: int = 128) -> dict[str, torch.Tensor]:
    """Tile-major bitmap + values + per-(tile, row) offsets (see module docstring)."""
    if block_k % 8 or block_k <= 0:
        raise ValueError(f"bitmap block_k must be a positive multiple of 8, got {block_k}")
    n, k = packed.shape
    kt = max(_ceil_div(k, block_k), 1)
    kp = kt * block_k
    kept = torch.zeros(n, kp, dtype=torch.bool, device=packed.device)
    kept[:, :k] = kept_mask(packed)
    w_q = torch.zeros(n, kp, dtype=torch.int8, device=packed.device)
    w_q[:, :k] = unpack_int8(packed)
    # [N, KT, BK] -> [KT, N, BK]: tile-major, rows in order inside a tile.
    kept_t = kept.view(n, kt, block_k).transpose(0, 1).contiguous()
    w_t = w_q.view(n, kt, block_k).transpose(0, 1).contiguous()
    values = w_t[kept_t].contiguous()
    counts = kept_t.sum(-1, dtype=torch.int64).reshape(-1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    weights = 1 << torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (kept_t.view(kt, n, block_k // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return {"bits": bits.contiguous(), "values": values,
            "offsets": offsets.view(kt, n).to(torch.int32).contiguous()}


def block_layout(packed: PackedWeight, block_n: int = 64, block_k: int = 64) -> dict[str, torch.Tensor]:
    """Dense int8 weight + per-N-tile list of the K tiles that hold any kept weight."""
    n, k = packed.shape
    nt, kt = _ceil_div(n, block_n), _ceil_div(k, block_k)
    kept = torch.zeros(nt * block_n, kt * block_k, dtype=torch.bool, device=packed.device)
    kept[:n, :k] = kept_mask(packed)
    tile_any = kept.view(nt, block_n, kt, block_k).any(3).any(1)  # [NT, KT]
    tile_ptr = torch.zeros(nt + 1, dtype=torch.int64, device=packed.device)
    tile_ptr[1:] = tile_any.sum(1).cumsum(0)
    tile_k = tile_any.nonzero()[:, 1]  # row-major nonzero: grouped by nt, ascending kt
    return {"dense": unpack_int8(packed).contiguous(), "tile_ptr": tile_ptr.to(torch.int32),
            "tile_k": tile_k.to(torch.int32).contiguous()}


def tile_density(layout: dict[str, torch.Tensor], n: int, k: int, block_n: int = 64,
                 block_k: int = 64) -> float:
    """Fraction of block_n x block_k tiles a block-sparse kernel must read."""
    total = _ceil_div(n, block_n) * _ceil_div(k, block_k)
    return layout["tile_k"].numel() / max(total, 1)


def sp24_layout(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """2:4 compressed values [N, K/2] and 4-bit-per-group index metadata [N, K/32] (int32)."""
    if packed.pattern != "2:4":
        raise ValueError(f"the 2:4 layout needs a '2:4' packed weight, got {packed.pattern!r}")
    n, k = packed.shape
    if k % 32:
        raise ValueError(f"the 2:4 kernel needs in_features divisible by 32, got {k}")
    kept = kept_mask(packed).view(n, k // 4, 4)
    w_q = unpack_int8(packed).view(n, k // 4, 4)
    # Choose 2 distinct positions per group: kept ones first (in order), then pruned ones to fill.
    pos = torch.arange(4, device=packed.device).expand_as(kept)
    order = torch.argsort((~kept).to(torch.int8) * 4 + pos, dim=-1)  # kept first, ascending index
    idx = order[..., :2].sort(dim=-1).values  # idx0 < idx1
    values = torch.gather(w_q, -1, idx).reshape(n, k // 2)
    # A pruned slot picked as filler holds the weight's 0 from unpack_int8, so it adds nothing.
    nibble = (idx[..., 1] << 2) | idx[..., 0]  # [N, K/4], 4 bits each
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int64)
    words = (nibble.view(n, k // 32, 8).to(torch.int64) << shifts).sum(-1)
    meta = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"values": values.contiguous(), "meta": meta.contiguous()}


def sp24_to_dense(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of sp24_layout (for tests): the dense int8 [N, K] weight."""
    n, half = values.shape
    k = half * 2
    words = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=values.device, dtype=torch.int64)
    nibble = ((words.unsqueeze(-1) >> shifts) & 0xF).view(n, k // 4)
    idx = torch.stack([nibble & 3, nibble >> 2], -1)
    dense = torch.zeros(n, k // 4, 4, dtype=torch.int8, device=values.device)
    dense.scatter_(-1, idx, values.view(n, k // 4, 2))
    return dense.view(n, k)
