"""A CPU emulation of csrc/cuda/sp24_int8.cu's data movement, checked against the reference.

No GPU here, so this replays, in Python, what every lane of the kernel loads into shared memory and
into its mma.sp registers (the index arithmetic of load_stage, the fragment reads and
meta_fragment, transcribed from the .cu), then applies mma.sp's documented semantics (PTX ISA:
sparse mma.m16n8k32 .s8 fragments for A, mma.m16n8k32 for B and C) lane by lane. The metadata
register layout is documented only as a figure, so each of the kernel's two meta_mode choices is
paired with the hardware layout it assumes; the device picks the true one at first use
(sparse_ofa/backends/cuda.py). What this catches: tiling, padding, shared-memory offsets,
fragment and output index mistakes, and a layout (kernels/layouts.py:sp24_layout) that does not
match what the kernel reads.
"""
import numpy as np
import pytest
import torch

from sparse_ofa.backends.cuda import META_MODES, prepare_sp24
from sparse_ofa.formats import pack, unpack_int8
from conftest import sparse_weight

ROWS, TOKENS, KSTAGE, A_STRIDE, B_STRIDE = 128, 64, 64, 48, 80  # csrc/cuda/sp24_int8.cu constants


def _stage(x, values, meta, row0, tok0, kt):
    """Shared memory after load_stage: (a bytes, b bytes, meta words)."""
    m, k = x.shape
    a = np.zeros(ROWS * A_STRIDE, np.int8)
    b = np.zeros(TOKENS * B_STRIDE, np.int8)
    words = np.zeros(ROWS * 2, np.uint32)
    k0 = kt * KSTAGE
    for tid in range(256):
        r, part = tid >> 1, tid & 1
        src = values[row0 + r, k0 // 2 + part * 16: k0 // 2 + part * 16 + 16]
        a[r * A_STRIDE + part * 16: r * A_STRIDE + part * 16 + 16] = src
        tok, part = tid >> 2, tid & 3
        if tok0 + tok < m:  # else zero-filled (src_size 0)
            b[tok * B_STRIDE + part * 16: tok * B_STRIDE + part * 16 + 16] = \
                x[tok0 + tok, k0 + part * 16: k0 + part * 16 + 16]
        if tid < ROWS:
            words[tid * 2: tid * 2 + 2] = meta[row0 + tid, k0 // 32: k0 // 32 + 2]
    return a, b, words


def _meta_fragment(words, r0, ks, g, t, mode):
    lo = int(words[(r0 + g) * 2 + ks])
    hi = int(words[(r0 + g + 8) * 2 + ks])
    if mode == META_MODES["rows"]:
        return lo if t == 0 else hi
    shift = (t & 1) * 16
    return ((lo >> shift) & 0xFFFF) | (((hi >> shift) & 0xFFFF) << 16)


def _mma_sp(acc, a_regs, b_regs, e_regs, hw_mode):
    """mma.sp m16n8k32 .s8, selector 0, as the PTX manual defines it, over 32 lanes' registers."""
    a_dense = np.zeros((16, 32), np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, row in ((0, g), (1, g + 8)):
            kept = a_regs[lane][reg]  # 4 int8: groups 2t and 2t+1 of this row, 2 values each
            for half in range(2):
                group = 2 * t + half
                nib = _hw_nibble(e_regs, row, group, hw_mode)
                idx0, idx1 = nib & 3, nib >> 2
                a_dense[row, 4 * group + idx0] += kept[2 * half]
                a_dense[row, 4 * group + idx1] += kept[2 * half + 1]
    b_dense = np.zeros((32, 8), np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        b_dense[4 * t: 4 * t + 4, g] = b_regs[lane][0]
        b_dense[16 + 4 * t: 16 + 4 * t + 4, g] = b_regs[lane][1]
    d = a_dense @ b_dense
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        acc[lane] += [d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]]


def _hw_nibble(e_regs, row, group, hw_mode):
    """Which lane's metadata register, and which bits, describe (row, group) under a layout."""
    g8, upper = row % 8, row >= 8
    if hw_mode == META_MODES["rows"]:  # t = 0 holds row g, t = 1 row g + 8; 8 groups per word
        word = e_regs[4 * g8 + (1 if upper else 0)]
        return (word >> (4 * group)) & 0xF
    # halves: t holds groups 4t..4t+3; row g in bits 0-15, row g + 8 in bits 16-31
    word = e_regs[4 * g8 + group // 4]
    return (word >> (16 * upper + 4 * (group % 4))) & 0xF


def _emulate(x, values, meta, n, meta_mode, hw_mode):
    m, k = x.shape
    out = np.zeros((m, n), np.int64)
    as_u32 = lambda buf, off: buf[off: off + 4].copy()  # noqa: E731 - 4 int8 lanes of a .b32
    for bx in range(values.shape[0] // ROWS):
        for by in range(-(-m // TOKENS)):
            row0, tok0 = bx * ROWS, by * TOKENS
            acc = np.zeros((8, 2, 4, 32, 4), np.int64)  # warp, i, j, lane, c
            for kt in range(k // KSTAGE):
                a, b, words = _stage(x, values, meta, row0, tok0, kt)
                for warp in range(8):
                    wr, wc = (warp & 3) * 32, (warp >> 2) * 32
                    for ks in range(2):
                        for i in range(2):
                            a_regs, e_regs = [], []
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                r = wr + i * 16 + g
                                a_regs.append((as_u32(a, r * A_STRIDE + ks * 16 + t * 4),
                                               as_u32(a, (r + 8) * A_STRIDE + ks * 16 + t * 4)))
                                e_regs.append(_meta_fragment(words, wr + i * 16, ks, g, t, meta_mode))
                            for j in range(4):
                                b_regs = []
                                for lane in range(32):
                                    g, t = lane >> 2, lane & 3
                                    c = wc + j * 8 + g
                                    b_regs.append((as_u32(b, c * B_STRIDE + ks * 32 + t * 4),
                                                   as_u32(b, c * B_STRIDE + ks * 32 + 16 + t * 4)))
                                _mma_sp(acc[warp, i, j], a_regs, b_regs, e_regs, hw_mode)
            for warp in range(8):
                wr, wc = (warp & 3) * 32, (warp >> 2) * 32
                for i in range(2):
                    for j in range(4):
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            ni, mi = row0 + wr + i * 16 + g, tok0 + wc + j * 8 + 2 * t
                            for c, (dm, dn) in enumerate(((0, 0), (1, 0), (0, 8), (1, 8))):
                                if mi + dm < m and ni + dn < n:
                                    out[mi + dm, ni + dn] = acc[warp, i, j, lane, c]
    return out


@pytest.mark.parametrize("mode", sorted(META_MODES))
def test_emulated_kernel_equals_reference(mode):
    n, k, m = 136, 128, 70  # 2 row blocks (one padded), 2 token blocks (one partial), 2 K stages
    packed = pack(sparse_weight(n, k, 0.5, "2:4"), "2:4")
    prepared = prepare_sp24(packed)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    got = _emulate(x.numpy(), prepared["values"].numpy(), prepared["meta"].numpy().view(np.uint32), n,
                   META_MODES[mode], META_MODES[mode])
    expected = (x.double() @ unpack_int8(packed).double().T).long().numpy()
    assert np.array_equal(got, expected)


def test_emulation_detects_a_mismatched_metadata_layout():
    # The self-check on the device relies on the two layouts giving different products.
    n, k, m = 128, 64, 16
    packed = pack(sparse_weight(n, k, 0.5, "2:4"), "2:4")
    prepared = prepare_sp24(packed)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    got = _emulate(x.numpy(), prepared["values"].numpy(), prepared["meta"].numpy().view(np.uint32), n,
                   META_MODES["rows"], META_MODES["halves"])
    expected = (x.double() @ unpack_int8(packed).double().T).long().numpy()
    assert not np.array_equal(got, expected)
