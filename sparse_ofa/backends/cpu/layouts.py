"""CPU weight layouts, derived from packed format v1 once per module (never saved):

- kind 0, aligned quads (csrc/cpu/sparse_cpu.h): each output row keeps the aligned input-channel quads
  (k = 4q..4q+3) that hold a non-zero weight, as one int32 of 4 int8 weights plus the quad index. For
  "1x4" weights the kept quads are exactly the kept blocks; for unstructured weights a quad with any
  non-zero weight is kept, zeros inside (at 90 % sparsity ~34 % of the quads, 3.4x the useful work).
- kind 1, gathered quads (unstructured / 2:4 only): a row's non-zero weights in groups of 4 arbitrary
  input channels; the kernel interleaves 4 activation rows in registers. No padding work, ~1.5x the
  cost per quad.
- the dense int16 panel (csrc/cpu/dense_gemm.h) of the dense backend's panel route.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...formats import PackedWeight, unpack_int8

LAYOUT_VERSION = 2  # "quads v2": 16-bit quad_k
MAX_QUAD_CHANNELS = 65536  # input channels a 16-bit quad index reaches; wider layers keep another backend
PANEL_VERSION = 1  # csrc/cpu_dense.cpp kPanelVersion
PANEL_COLS = 16    # csrc/cpu/dense_gemm.h kDenseCols


def _as_u16(index: torch.Tensor) -> torch.Tensor:
    """Indices in [0, 65536) as the int16 tensor whose bits the kernels read as uint16."""
    index = index.to(torch.int32)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= MAX_QUAD_CHANNELS):
        raise ValueError(f"quad index out of the 16-bit range [0, {MAX_QUAD_CHANNELS})")
    return torch.where(index >= 32768, index - 65536, index).to(torch.int16).contiguous()


def derive_quads(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """Layout kind 0, aligned quads (csrc/cpu/sparse_cpu.h), from packed format v1."""
    packed.validate()
    w = unpack_int8(packed).cpu()
    n, k = w.shape
    w4 = F.pad(w, (0, -k % 4)).view(n, -1, 4)
    kept = (w4 != 0).any(-1)                      # [N, Q]: quads with a non-zero weight
    rows_quads = kept.nonzero()                   # row-major: ascending q within each row
    quad_w = w4[kept].contiguous().view(torch.int32).reshape(-1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = kept.sum(1).cumsum(0)
    return {
        "quad_w": quad_w,
        "quad_k": _as_u16(rows_quads[:, 1]),
        "row_ptr": row_ptr.to(torch.int32),
        "rowsum": w.sum(1, dtype=torch.int32),
        "layout": torch.tensor([LAYOUT_VERSION, n, k, quad_w.numel(), 0], dtype=torch.int32),
    }


def derive_gathered(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """Layout kind 1, gathered quads: each row's non-zero weights, ascending k, in groups of 4
    arbitrary input channels; the last group of a row padded with weight 0 on its first channel."""
    packed.validate()
    w = unpack_int8(packed).cpu()
    n, k = w.shape
    nonzero = w != 0
    rows, cols = nonzero.nonzero(as_tuple=True)
    counts = nonzero.sum(1)
    quads_per_row = (counts + 3) // 4
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = quads_per_row.cumsum(0)
    first_nz = torch.zeros(n + 1, dtype=torch.int64)
    first_nz[1:] = counts.cumsum(0)
    slot = row_ptr[rows] * 4 + (torch.arange(rows.numel()) - first_nz[rows])
    nq = int(row_ptr[-1])
    quad_k = torch.full((nq * 4,), -1, dtype=torch.int64)
    quad_k[slot] = cols
    values = torch.zeros(nq * 4, dtype=torch.int8)
    values[slot] = w[rows, cols]
    quad_k = quad_k.view(nq, 4)
    quad_k = torch.where(quad_k < 0, quad_k[:, :1].expand_as(quad_k), quad_k)  # padding: a real row
    return {
        "quad_w": values.view(nq, 4).view(torch.int32).reshape(-1).contiguous(),
        "quad_k": _as_u16(quad_k.reshape(-1)),
        "row_ptr": row_ptr.to(torch.int32),
        "rowsum": w.sum(1, dtype=torch.int32),
        "layout": torch.tensor([LAYOUT_VERSION, n, k, nq, 1], dtype=torch.int32),
    }


def derive_panel(w_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int16 weight panel of the panel route (csrc/cpu/dense_gemm.h) from W_q int8 [N, K]:
    panel[s, p, c, j] = W_q[16 s + c, 2 p + j], zeros past N and K; w_layout = [version, N, K]."""
    n, k = w_q.shape
    w = F.pad(w_q.cpu().to(torch.int16), (0, k % 2, 0, -n % PANEL_COLS))
    panel = w.view(w.shape[0] // PANEL_COLS, PANEL_COLS, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
    return {"w_panel": panel, "w_layout": torch.tensor([PANEL_VERSION, n, k], dtype=torch.int32)}
