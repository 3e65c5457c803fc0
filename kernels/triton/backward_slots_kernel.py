"""Backward kernel B1: per-slot gradients (routing weight, rank-space gradient, input) for one tile of slots.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), D = d_in, O = d_out.

With g = dL/dy [T, O], the saved unscaled h [S, r] (row = sorted position p), e = tile_expert[i], slot s at p,
token t = s // K and scaling s_c:

    z[p, :]   = g[t, :] @ B_e                        fp32 [BLOCK_M, BLOCK_R], loop over O by BLOCK_N
    dw[s]     = s_c * <z[p, :], h[p, :]>              stored by split 0 (each slot belongs to one tile: plain store)
    dh[p, :]  = s_c * w[s] * z[p, :]                  stored by split 0, fp32, for the weight-gradient kernel
    dx_s[s,:] = dh[p, :] @ A_e                        split n's BLOCK_K column blocks of D

``dx_s`` is stored per slot (deterministic; the caller sums the K slots of a token) or, with ATOMIC, atomically
added into row t of an fp32 [T, D] buffer. COMPUTE_DX=False skips the last step (x needs no gradient).
Every split recomputes z (it re-reads g's row: split only when the tiles alone underfill the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .autotune import prune_slot_configs, slot_kernel_configs
from .tiles import expand, rank_offsets, rank_rows, scale_by_weights, shrink, tile_rows


@triton.jit
def lora_experts_bwd_slots_kernel(
    g_ptr,  # [T, O] upstream gradient
    a_ptr,  # [E, r, D]
    b_ptr,  # [E, O, r]
    w_ptr,  # [S] routing weights
    h_ptr,  # [S, r] fp32 saved h, row = sorted position
    order_ptr,  # [S] int32
    ends_ptr,  # [E] int32
    tile_expert_ptr,  # [N] int32, -1 = surplus
    tile_start_ptr,  # [N] int32
    dw_ptr,  # [S] fp32
    dh_ptr,  # [S, r] fp32, row = sorted position
    dx_ptr,  # [S, D] per slot, or [T, D] fp32 when ATOMIC
    D,
    O,
    R,
    scaling,
    stride_gt,
    stride_go,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_be,
    stride_bo,
    stride_br,
    stride_dx,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_SPLIT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    ATOMIC: tl.constexpr,
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

    # z = g[tok] @ B_e, fp32 accumulate over O.
    z_MR = shrink(
        g_ptr, tok_M, row_ok_M, stride_gt, stride_go, b_ptr + expert64 * stride_be, stride_bo, stride_br,
        offs_r, r_ok, O, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION,
    )  # fmt: skip

    dh_MR = scale_by_weights(z_MR, w_ptr, slot_M, row_ok_M, scaling)
    if pid_split == 0:
        rank_offs, rank_mask = rank_rows(pos_M, row_ok_M, offs_r, r_ok, R)
        h_MR = tl.load(h_ptr + rank_offs, mask=rank_mask, other=0.0)
        dw_M = tl.sum(z_MR * h_MR, axis=1) * scaling
        tl.store(dw_ptr + slot_M, dw_M, mask=row_ok_M)
        tl.store(dh_ptr + rank_offs, dh_MR, mask=rank_mask)

    if COMPUTE_DX:
        expand(
            dh_MR.to(g_ptr.dtype.element_ty), a_ptr + expert64 * stride_ae, stride_ad, stride_ar, offs_r, r_ok,
            dx_ptr, stride_dx, slot_M, tok_M, row_ok_M, D, pid_split, BLOCK_K, N_SPLIT, ATOMIC, DOT_PRECISION,
        )  # fmt: skip


# CUDA only, deterministic path only (see forward_kernel.py). Every trial fully overwrites dw, dh and dx.
lora_experts_bwd_slots_kernel_autotuned = triton.autotune(
    configs=slot_kernel_configs(),
    key=["D", "O", "R", "BLOCK_M", "BLOCK_R", "TOP_K", "COMPUTE_DX"],
    prune_configs_by={"early_config_prune": prune_slot_configs},
)(lora_experts_bwd_slots_kernel)
