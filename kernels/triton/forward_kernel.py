"""Fused forward kernel: shrink, scale and expand for one tile of expert-sorted slots.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), D = d_in, O = d_out.

One program = (tile i of the tile map, split n). With e = tile_expert[i] and the tile's slots s (token t = s // K):

    h[s, :]  = x[t, :] @ A_e^T                       fp32 accumulator [BLOCK_M, BLOCK_R], loop over D by BLOCK_K
    hs[s, :] = h[s, :] * (scaling * w[s])            r multiplies per slot instead of O
    u[s, o]  = hs[s, :] @ B_e[o, :]^T                o in split n's BLOCK_N column blocks

``u`` is stored per slot (row s of a [S, O] buffer, each element written by exactly one program, so the result is
bit-reproducible; the caller sums the K slots of a token) or, with ATOMIC, atomically added into row t of an fp32
[T, O] buffer (faster, order-nondeterministic). Split 0 also stores the unscaled fp32 h at the slot's sorted
position p, for the backward. Every split recomputes h (cheap: r/D of its loads are weights).

This file imports triton; the launcher imports it lazily so that the package imports without triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .autotune import prune_slot_configs, slot_kernel_configs
from .tiles import expand, rank_offsets, rank_rows, scale_by_weights, shrink, tile_rows


@triton.jit
def lora_experts_fwd_kernel(
    x_ptr,  # [T, D]
    a_ptr,  # [E, r, D]
    b_ptr,  # [E, O, r]
    w_ptr,  # [S] routing weights
    order_ptr,  # [S] int32 slot at each sorted position
    ends_ptr,  # [E] int32
    tile_expert_ptr,  # [N] int32, -1 = surplus
    tile_start_ptr,  # [N] int32
    out_ptr,  # [S, O] per-slot output, or [T, O] fp32 when ATOMIC
    h_ptr,  # [S, r] fp32, row = sorted position (written when SAVE_H)
    D,
    O,
    R,
    scaling,
    stride_xt,
    stride_xd,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_be,
    stride_bo,
    stride_br,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
    SAVE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_tile)
    if expert < 0:
        return
    expert64 = expert.to(tl.int64)
    pos_M, row_ok_M, slot_M, tok_M = tile_rows(order_ptr, ends_ptr, tile_start_ptr, pid_tile, expert, TOP_K, BLOCK_M)
    offs_r, r_ok = rank_offsets(R, BLOCK_R)

    # Shrink: h = x[tok] @ A_e^T, fp32 accumulate.
    h_MR = shrink(
        x_ptr, tok_M, row_ok_M, stride_xt, stride_xd, a_ptr + expert64 * stride_ae, stride_ad, stride_ar,
        offs_r, r_ok, D, BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip

    if SAVE_H:  # noqa: SIM102  (a compile-time branch around a runtime one: keep them apart for triton)
        if pid_split == 0:
            rank_offs, rank_mask = rank_rows(pos_M, row_ok_M, offs_r, r_ok, R)
            tl.store(h_ptr + rank_offs, h_MR, mask=rank_mask)

    hs_MR = scale_by_weights(h_MR, w_ptr, slot_M, row_ok_M, scaling).to(x_ptr.dtype.element_ty)

    # Expand: u = hs @ B_e^T over this split's column blocks.
    expand(
        hs_MR, b_ptr + expert64 * stride_be, stride_bo, stride_br, offs_r, r_ok, out_ptr, stride_out,
        slot_M, tok_M, row_ok_M, O, pid_split, BLOCK_N, N_SPLIT, ATOMIC, DOT_PRECISION,
    )  # fmt: skip


# CUDA only: the autotuner benchmarks on the device, which the interpreter has not got. Only the deterministic
# path is autotuned (the atomic path would need its output re-zeroed between trials). Outputs are fully
# overwritten by every trial, so repeated trial launches are harmless.
lora_experts_fwd_kernel_autotuned = triton.autotune(
    configs=slot_kernel_configs(),
    key=["D", "O", "R", "BLOCK_M", "BLOCK_R", "TOP_K"],
    prune_configs_by={"early_config_prune": prune_slot_configs},
)(lora_experts_fwd_kernel)
