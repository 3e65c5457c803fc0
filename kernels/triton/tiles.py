"""``@triton.jit`` helpers shared by the kernels: tile rows, rank offsets, scaling, shrink, expand, outer sums.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), M rows of a tile.

Triton inlines a jit function called from a jit kernel, so these cost nothing at run time. A helper cannot end its
caller's program, so the kernels load the tile's expert and return on the -1 sentinel themselves.

This file imports triton; only the kernel files import it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sorted_rows(order_ptr, pos_M, pos_end, TOP_K: tl.constexpr):
    """(row_ok_M, slot_M, tok_M) of sorted positions pos_M: in range (< pos_end), their slot, its int64 token."""
    row_ok_M = pos_M < pos_end
    slot_M = tl.load(order_ptr + pos_M, mask=row_ok_M, other=0)
    tok_M = (slot_M // TOP_K).to(tl.int64)
    return row_ok_M, slot_M, tok_M


@triton.jit
def tile_rows(order_ptr, ends_ptr, tile_start_ptr, pid_tile, expert, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """(pos_M, row_ok_M, slot_M, tok_M) of tile pid_tile, whose expert (not the sentinel) is ``expert``."""
    pos_end = tl.load(ends_ptr + expert)
    pos_M = tl.load(tile_start_ptr + pid_tile) + tl.arange(0, BLOCK_M)
    row_ok_M, slot_M, tok_M = sorted_rows(order_ptr, pos_M, pos_end, TOP_K)
    return pos_M, row_ok_M, slot_M, tok_M


@triton.jit
def rank_offsets(R, BLOCK_R: tl.constexpr):
    """(offs_r, r_ok): the BLOCK_R rank columns and which of them are < R."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    return offs_r, r_ok


@triton.jit
def rank_rows(pos_M, row_ok_M, offs_r, r_ok, R):
    """(offsets, mask) of the [M, BLOCK_R] block of an [S, R] row-major buffer whose rows are sorted positions."""
    return pos_M.to(tl.int64)[:, None] * R + offs_r[None, :], row_ok_M[:, None] & r_ok[None, :]


@triton.jit
def scale_by_weights(v_MR, w_ptr, slot_M, row_ok_M, scaling):
    """v_MR * (scaling * w[slot]) row by row, w loaded as fp32."""
    w_M = tl.load(w_ptr + slot_M, mask=row_ok_M, other=0.0).to(tl.float32)
    return v_MR * (w_M * scaling)[:, None]


@triton.jit
def token_rows(in_ptr, tok_M, row_ok_M, stride_in_t, stride_in_c, offs_c, c_ok):
    """The [M, C-block] block in[tok, offs_c] of a [T, C] input (0 outside the rows and columns in range)."""
    return tl.load(
        in_ptr + tok_M[:, None] * stride_in_t + offs_c[None, :] * stride_in_c,
        mask=row_ok_M[:, None] & c_ok[None, :],
        other=0.0,
    )


@triton.jit
def shrink(
    in_ptr,
    tok_M,
    row_ok_M,
    stride_in_t,
    stride_in_c,
    w_base,
    stride_w_c,
    stride_w_r,
    offs_r,
    r_ok,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[M, r] = in[tok, :] @ W[:, r] over C columns by BLOCK_C: fp32 accumulator, W cast to in's dtype.

    W is one expert's [C, r] matrix (A_e^T or B_e) at w_base with the given strides.
    """
    compute_dtype = in_ptr.dtype.element_ty
    acc_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        in_MC = token_rows(in_ptr, tok_M, row_ok_M, stride_in_t, stride_in_c, offs_c, c_ok)
        w_CR = tl.load(
            w_base + offs_c[:, None] * stride_w_c + offs_r[None, :] * stride_w_r,
            mask=c_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc_MR = tl.dot(in_MC, w_CR.to(compute_dtype), acc_MR, input_precision=DOT_PRECISION)
    return acc_MR


@triton.jit
def expand(
    v_MR,
    w_base,
    stride_w_c,
    stride_w_r,
    offs_r,
    r_ok,
    out_ptr,
    stride_out,
    slot_M,
    tok_M,
    row_ok_M,
    C,
    pid_split,
    BLOCK_C: tl.constexpr,
    N_SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[row, c] = v[M, :] @ W[c, :]^T over split pid_split's BLOCK_C column blocks of C (W cast to v's dtype).

    W is one expert's [C, r] matrix (B_e or A_e^T) at w_base. Rows are slots (plain store in out's dtype) or, with
    ATOMIC, tokens (fp32 atomic add).
    """
    if ATOMIC:
        out_row_M = tok_M
    else:
        out_row_M = slot_M.to(tl.int64)
    for c0 in range(pid_split * BLOCK_C, C, N_SPLIT * BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        w_RC = tl.load(
            w_base + offs_r[:, None] * stride_w_r + offs_c[None, :] * stride_w_c,
            mask=r_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        u_MC = tl.dot(v_MR, w_RC.to(v_MR.dtype), input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + out_row_M[:, None] * stride_out + offs_c[None, :]
        out_mask = row_ok_M[:, None] & c_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, u_MC, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, u_MC.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def expert_outer_sum(
    rank_ptr,
    in_ptr,
    stride_in_t,
    stride_in_c,
    offs_c,
    c_ok,
    order_ptr,
    pos_start,
    pos_end,
    w_ptr,
    scaling,
    offs_r,
    r_ok,
    R,
    TOP_K: tl.constexpr,
    BLOCK_MW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[r, c] = sum over sorted positions p in [pos_start, pos_end) of L[p, r] * in[t, c], fp32, fixed order.

    L is rank_ptr's [S, R] row p (times scaling * w[s] when SCALE_ROWS), cast to in's dtype; c runs over the
    columns offs_c of the [T, C] input; BLOCK_MW positions per step.
    """
    acc_RW = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for p0 in range(pos_start, pos_end, BLOCK_MW):
        pos_M = p0 + tl.arange(0, BLOCK_MW)
        row_ok_M, slot_M, tok_M = sorted_rows(order_ptr, pos_M, pos_end, TOP_K)
        rank_offs, rank_mask = rank_rows(pos_M, row_ok_M, offs_r, r_ok, R)
        l_MR = tl.load(rank_ptr + rank_offs, mask=rank_mask, other=0.0)
        in_MW = token_rows(in_ptr, tok_M, row_ok_M, stride_in_t, stride_in_c, offs_c, c_ok)
        if SCALE_ROWS:
            l_MR = scale_by_weights(l_MR, w_ptr, slot_M, row_ok_M, scaling)
        acc_RW = tl.dot(tl.trans(l_MR.to(in_MW.dtype)), in_MW, acc_RW, input_precision=DOT_PRECISION)
    return acc_RW
